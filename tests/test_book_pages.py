"""book/check_pages.py, which checks a built book for failed chapters, on tiny built books made here: it passes a good
one and names each page that shows a traceback and each execution report left in the site."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book"))
from check_pages import main, problems  # noqa: E402

GOOD = '<div class="cell_output docutils container"><div class="output stream highlight-myst-ansi">42</div></div>'
ERROR = ('<div class="cell_output docutils container"><div class="output traceback highlight-ipythontb notranslate">'
         '<pre>ZeroDivisionError: division by zero</pre></div></div>')
PRINTED = "<pre>Traceback (most recent call last):\n  File ...\nValueError: no</pre>"


def book(root: Path, pages: dict[str, str], reports: dict[str, str] | None = None) -> Path:
    """A built book: each page, a copy of it under _static/ (not a page: never checked), the execution reports."""
    for name, body in {**pages, **{f"_static/{n}": b for n, b in pages.items()}}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"<html><body>{body}</body></html>")
    for name, text in (reports or {}).items():
        (root / "reports" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "reports" / name).write_text(text)
    return root


def test_a_good_book_passes(tmp_path, capsys):
    html = book(tmp_path, {"index.html": GOOD, "nbs/01_one.html": GOOD})
    assert problems(html) == [] and main([str(html)]) == 0
    assert "no tracebacks" in capsys.readouterr().out


def test_tracebacks_and_reports_are_named(tmp_path, capsys):
    html = book(tmp_path, {"index.html": GOOD, "nbs/01_one.html": ERROR, "nbs/02_two.html": PRINTED},
                reports={"nbs/03_three.err.log": "Traceback (most recent call last):\nNameError: x\n"})
    assert problems(html) == ["nbs/01_one.html: shows a traceback", "nbs/02_two.html: shows a traceback",
                              "reports/nbs/03_three.err.log: an execution report (Traceback (most recent call last):)"]
    assert main([str(html)]) == 1
    assert "3 problem(s)" in capsys.readouterr().err


def test_no_book_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2 and "make book" in capsys.readouterr().err
