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


COLUMN = 95   # the book's code column: a longer line scrolls sideways on the page (STYLE.md)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_code_fits_the_books_column(notebook):
    import nbformat

    long = [f"cell {i} line {j + 1} ({len(line)} characters)"
            for i, cell in enumerate(nbformat.read(notebook, as_version=4).cells) if cell.cell_type == "code"
            for j, line in enumerate(cell.source.splitlines()) if len(line) > COLUMN]
    assert not long, f"{notebook.name}: code lines over {COLUMN} characters: {long[:10]}"


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


def _chapters() -> dict[str, int]:
    """module name -> the number of the chapter that exports it (nbs/NN_topic.ipynb with `#| default_exp module`)."""
    import re

    out = {}
    for nb in NOTEBOOKS:
        found = re.search(r"#\| default_exp (\w+)", nb.read_text())
        if found and nb.stem[:2].isdigit():
            out[found.group(1)] = int(nb.stem[:2])
    return out


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(llmjax module, names) for every import of an llmjax module in a file, at any depth (lazy imports count)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module.startswith("llmjax"):
                name = module.removeprefix("llmjax").lstrip(".")
                names = [a.name for a in node.names]
                if not name:   # from llmjax import gemma, llama
                    found += [(n, []) for n in names]
                else:
                    found.append((name.split(".")[0], names))
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], []) for a in node.names if a.name.startswith("llmjax.")]
    return found


ARCHITECTURES = {"gpt2", "llama", "gemma", "mistral"}
NEVER = {**{a: {"generation", "validation", "models", "bench", "cli"} for a in ARCHITECTURES},
         "generation": ARCHITECTURES | {"moe", "models"}, "validation": {"models"}}


def test_modules_import_only_earlier_chapters():
    """The layering rule written in the index chapter: a module imports only from earlier chapters (lazy imports
    included), never another module's private names, and the three explicit rules hold."""
    chapters = _chapters()
    problems = []
    for path in sorted((ROOT / "llmjax").glob("*.py")):
        module = path.stem
        if module not in chapters:
            continue
        for imported, names in _imports(path):
            if imported not in chapters:
                continue
            if chapters[imported] >= chapters[module] and imported != module:
                problems.append(f"{module} (chapter {chapters[module]}) imports {imported} (chapter {chapters[imported]})")
            if imported in NEVER.get(module, ()):
                problems.append(f"{module} must not import {imported}")
            problems += [f"{module} imports the private {imported}.{n}" for n in names if n.startswith("_")]
    assert not problems, "; ".join(problems)


def test_package_has_no_unused_imports_or_undefined_names():
    out = subprocess.run([BIN / "ruff", "check", "--no-cache", "--select", "F401,F811,F821,F841", "--exclude",
                          "llmjax/_modidx.py", "--output-format", "concise", "llmjax"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_book_order_is_chapter_order():
    """_toc.yml lists the chapters in the order of their numbers, each chapter's title carries its file's number,
    and every "chapter N" in the prose names a chapter that exists."""
    import re

    import nbformat

    toc = (ROOT / "_toc.yml").read_text()
    listed = [int(n) for n in re.findall(r"file: nbs/(\d\d)_", toc)]
    assert listed == sorted(listed) == sorted(int(nb.stem[:2]) for nb in NOTEBOOKS if nb.stem[:2].isdigit())
    numbers = set(listed)
    for nb in NOTEBOOKS:
        if not nb.stem[:2].isdigit():
            continue
        cells = nbformat.read(nb, as_version=4).cells
        assert cells[0].source.startswith(f"# {nb.stem[:2]} · "), f"{nb.name}: its title must start with its number"
        text = "\n".join(c.source for c in cells)
        for found in re.finditer(r"[Cc]hapters? ((?:\d+(?:, | and | or |–))*\d+)", text):
            cited = {int(n) for n in re.findall(r"\d+", found.group(1))}
            assert cited <= numbers, f"{nb.name} cites {found.group(0)!r}, but the chapters are {sorted(numbers)}"
