"""The book's diagrams (book/scripts/diagrams.py): the script draws every committed figure, each a small valid SVG with
its text kept as text, the committed ones are what it draws now, and the chapters show every figure and only those."""
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "nbs" / "figures"
SVG = "{http://www.w3.org/2000/svg}"
IMAGE = re.compile(r"!\[([^\]]*)\]\(figures/([^)\s]+)\)")


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("figures")
    subprocess.run([sys.executable, ROOT / "book" / "scripts" / "diagrams.py", "--out", out], check=True,
                   capture_output=True, timeout=120)
    return out


def texts(path: Path) -> list[str]:
    return sorted("".join(t.itertext()) for t in ET.parse(path).getroot().iter(f"{SVG}text"))


def chapter_images() -> dict[str, list[tuple[str, str]]]:
    """(alt text, figure file) of every image a chapter's Markdown shows, by chapter."""
    found = {}
    for notebook in sorted((ROOT / "nbs").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        found[notebook.name] = IMAGE.findall(text)
    return found


def test_the_script_draws_every_committed_figure(drawn):
    committed = sorted(p.name for p in FIGURES.glob("*.svg"))
    assert committed, "no figures in nbs/figures: run `make figures`"
    assert sorted(p.name for p in drawn.glob("*")) == committed


@pytest.mark.parametrize("name", sorted(p.name for p in FIGURES.glob("*.svg")))
def test_figure_is_a_small_valid_svg_with_text(drawn, name):
    path = drawn / name
    root = ET.parse(path).getroot()                     # well-formed XML, or this raises
    assert root.tag == f"{SVG}svg" and root.get("viewBox")
    assert 2_000 < path.stat().st_size <= 40_000, path.stat().st_size
    assert len(list(root.iter(f"{SVG}path"))) >= 10     # boxes and arrows, not an empty canvas
    words = texts(path)
    assert len(words) >= 5 and all(w.strip() for w in words)
    assert "<dc:date>" not in path.read_text()          # no build date: the same bytes on every run


@pytest.mark.parametrize("name", sorted(p.name for p in FIGURES.glob("*.svg")))
def test_committed_figure_is_what_the_script_draws(drawn, name):
    """Its words, at least (the bytes may differ with another matplotlib): `make figures` after editing the script."""
    assert texts(FIGURES / name) == texts(drawn / name), f"nbs/figures/{name} is stale: run `make figures`"


def test_every_figure_a_chapter_shows_exists_and_has_alt_text():
    for chapter, images in chapter_images().items():
        for alt, name in images:
            assert (FIGURES / name).is_file(), f"{chapter} shows figures/{name}, which does not exist"
            assert alt.strip(), f"{chapter} shows figures/{name} without alt text"


def test_every_figure_is_shown_by_a_chapter():
    shown = {name for images in chapter_images().values() for _, name in images}
    unshown = sorted(p.name for p in FIGURES.glob("*.svg") if p.name not in shown)
    assert not unshown, f"figures no chapter shows: {unshown}"
