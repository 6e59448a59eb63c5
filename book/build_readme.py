"""README.md mirrors nbs/index.ipynb: `make readme` writes it, tests/test_repo.py checks it is up to date."""
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter
from traitlets.config import Config

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- generated from nbs/index.ipynb by book/build_readme.py (make readme); do not edit -->\n\n"


def render(index: Path = ROOT / "nbs" / "index.ipynb") -> str:
    config = Config()
    config.TagRemovePreprocessor.remove_cell_tags = ("remove-cell",)
    config.TagRemovePreprocessor.enabled = True
    exporter = MarkdownExporter(config=config)
    body, _ = exporter.from_notebook_node(nbformat.read(index, as_version=4))
    lines = [line for line in body.splitlines() if not line.lstrip().startswith(("#|", "# NBVAL_"))]
    return HEADER + "\n".join(lines).strip() + "\n"


if __name__ == "__main__":
    (ROOT / "README.md").write_text(render(), encoding="utf-8")
    print("wrote README.md")
