"""Package metadata lives in settings.ini (nbdev's single source); this file only reads it."""
from configparser import ConfigParser
from pathlib import Path

from setuptools import find_packages, setup

root = Path(__file__).parent
cfg = ConfigParser(delimiters=["="])
cfg.read(root / "settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]


def reqs(key):
    return cfg.get(key, "").split()


# Every `NAME_requirements` key is the extra llmjax[NAME] (reference, models, cuda12, tpu); dev also brings the
# reference and the models, as the chapters run against both.
extras = {key.removesuffix("_requirements"): reqs(key) for key in cfg if key.endswith("_requirements")}
extras["dev"] = extras["reference"] + extras["models"] + extras["dev"]
setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=(root / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    license_files=["LICENSE"],
    url=cfg["git_url"],
    keywords=cfg["keywords"].split(),
    python_requires=">=" + cfg["min_python"],
    packages=find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    include_package_data=True,
    install_requires=reqs("requirements"),
    extras_require=extras,
    entry_points={"console_scripts": cfg["console_scripts"].split()},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    zip_safe=False,
)
