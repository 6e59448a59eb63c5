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


reference, models, dev = reqs("reference_requirements"), reqs("models_requirements"), reqs("dev_requirements")
setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=(root / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    url=cfg["git_url"],
    keywords=cfg["keywords"].split(),
    python_requires=">=" + cfg["min_python"],
    packages=find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    include_package_data=True,
    install_requires=reqs("requirements"),
    extras_require={"reference": reference, "models": models, "dev": reference + models + dev},
    entry_points={"console_scripts": cfg["console_scripts"].split()},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    zip_safe=False,
)
