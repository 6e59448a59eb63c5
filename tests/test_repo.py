"""Repository invariants: llmjax/ is what nbdev_export makes of nbs/, notebooks are clean, README mirrors index."""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A copy of the files nbdev reads, so the checks never touch the working tree."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("settings.ini", "setup.py", "pyproject.toml"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "nbs", root / "nbs")
    shutil.copytree(ROOT / "llmjax", root / "llmjax")
    return root


def differing_files(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [f"{a.name}/{n}" for n in cmp.diff_files + cmp.left_only + cmp.right_only]
    for sub, sub_cmp in cmp.subdirs.items():
        out += differing_files(a / sub, b / sub)
    return out


def test_generated_code_matches_notebooks(scratch):
    shutil.rmtree(scratch / "llmjax")
    (scratch / "llmjax").mkdir()
    shutil.copy(ROOT / "llmjax" / "__init__.py", scratch / "llmjax" / "__init__.py")
    subprocess.run([BIN / "nbdev_export"], cwd=scratch, check=True, capture_output=True)
    stale = differing_files(ROOT / "llmjax", scratch / "llmjax")
    assert not stale, f"llmjax/ differs from what nbdev_export makes of nbs/: {stale}; run `make export`"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(scratch, notebook):
    copy = scratch / "nbs" / notebook.name
    subprocess.run([BIN / "nbdev_clean", "--fname", str(copy)], cwd=scratch, check=True, capture_output=True)
    assert copy.read_bytes() == notebook.read_bytes(), f"{notebook.name} is not clean; run `make clean-nbs`"
    import nbformat

    with_outputs = [i for i, c in enumerate(nbformat.read(notebook, as_version=4).cells)
                    if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not with_outputs, f"{notebook.name} is committed with outputs in cells {with_outputs}; run `make clean-nbs`"


def test_readme_mirrors_index():
    sys.path.insert(0, str(ROOT / "book"))
    from build_readme import render

    assert (ROOT / "README.md").read_text(encoding="utf-8") == render(), "README.md is stale; run `make readme`"


def test_every_chapter_is_in_the_book():
    toc = (ROOT / "_toc.yml").read_text()
    missing = [nb.stem for nb in NOTEBOOKS if f"nbs/{nb.stem}" not in toc]
    assert not missing, f"chapters missing from _toc.yml: {missing}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_opens_in_colab(notebook):
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    if notebook.stem != "index":
        assert f"colab.research.google.com/github/llmjax/llmjax/blob/main/nbs/{notebook.name}" in nb.cells[0].source
        assert "google.colab" in first_code.source and "pip install" in first_code.source
