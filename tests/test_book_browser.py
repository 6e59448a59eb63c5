"""book/check_browser.py, which `make book` runs in headless Chromium over the built book: here only its judgement of
what a page showed (no browser), and book/_ext/unique_scripts.py, which keeps the theme's scripts from running twice."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book" / "_ext"))
from check_browser import problems  # noqa: E402
from unique_scripts import unique  # noqa: E402

GOOD = {"h1": "13 · How fast", "codeCells": 3, "outputs": 2, "tables": 1, "math": 2, "untypeset": [], "rawTex": [],
        "pipeParagraphs": [], "mathjax": "typeset", "errors": [], "scrolling": [], "codeColumn": 120,
        "images": [{"src": "../_images/plot.png", "complete": True, "width": 640, "height": 480},
                   {"src": "https://colab.research.google.com/assets/colab-badge.svg", "complete": True, "width": 0,
                    "height": 0}]}
BADGE = "Failed to load resource: net::ERR_NAME_NOT_RESOLVED https://colab.research.google.com/assets/colab-badge.svg"


def test_a_good_page_passes():
    """An external image is not fetched (the browser resolves 127.0.0.1 only): neither it nor its failed load counts;
    a code line wider than the column is a note, not a problem."""
    assert problems({**GOOD, "errors": [BADGE], "scrolling": ["x" * 130]}) == []


def test_each_fault_is_named():
    bad = {**GOOD, "h1": "", "outputs": 0, "pipeParagraphs": ["| model | batch | |---|---|"],
           "untypeset": [r"\(4D\)"], "rawTex": [r"width \(4D\)"], "mathjax": "not started",
           "images": [{"src": "../_images/empty.png", "complete": True, "width": 0, "height": 0}],
           "errors": ["SyntaxError: Identifier 'THEBE_JS_URL' has already been declared",
                      "Failed to load resource: net::ERR_NAME_NOT_RESOLVED https://cdn.example.org/require.min.js"]}
    found = problems(bad)
    for expected in ("no title", "not one output", "empty.png", "Markdown table shown as text", "not typeset",
                     "raw TeX", "never started", "THEBE_JS_URL", "require.min.js"):
        assert sum(expected in p for p in found) == 1, (expected, found)
    assert len(found) == 9


def test_a_page_without_code_needs_no_output():
    assert problems({**GOOD, "codeCells": 0, "outputs": 0}) == []


def test_each_script_once():
    """An inline script added twice, once with no file name (None) and once with "", is kept once, in place."""
    class Script:
        def __init__(self, filename, **attributes):
            self.filename, self.attributes = filename, attributes

    scripts = [Script("a.js"), Script(None, body="const X = 1"), Script("b.js", defer="defer"),
               Script("", body="const X = 1"), Script("a.js"), Script("", body="const Y = 2")]
    kept = unique(scripts)
    assert [(s.filename, s.attributes) for s in kept] == [("a.js", {}), (None, {"body": "const X = 1"}),
                                                         ("b.js", {"defer": "defer"}), ("", {"body": "const Y = 2"})]
