"""book/check_links.py, which `make book` runs over the built book, on a tiny built book made here: it passes a good
one and names each broken link, anchor, image and table-of-contents entry of a broken one."""
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book"))
from check_links import check, main  # noqa: E402

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0"
                    "00000301010018dd8db00000000049454e44ae426082")
TOC = """format: jb-book
root: nbs/index
parts:
  - caption: Chapters
    chapters:
      - file: nbs/01_one
      - file: book/references
"""


def page(title: str, body: str, up: str = "../") -> str:
    """A page as Jupyter Book lays it out: a stylesheet, the sidebar's table of contents, the article."""
    return f"""<!DOCTYPE html><html><head><title>{title}</title>
<link rel="stylesheet" href="{up}_static/custom.css?v=4aec4a9b" /></head><body>
<a href="#main-content">Skip</a>
<nav class="bd-links bd-docs-nav" aria-label="Main"><ul class="nav bd-sidenav">
<li class="toctree-l1"><a class="reference internal" href="{up}nbs/01_one.html">1 · One</a></li>
<li class="toctree-l1"><a class="reference internal" href="{up}book/references.html">References</a></li>
</ul></nav>
<main id="main-content"><section id="{title.lower()}"><h1>{title}<a class="headerlink" href="#{title.lower()}">#</a></h1>
{body}</section></main></body></html>"""


@pytest.fixture
def book(tmp_path) -> tuple[Path, Path]:
    html = tmp_path / "html"
    for folder in ("nbs", "book", "_static", "_images"):
        (html / folder).mkdir(parents=True)
    (html / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=nbs/index.html" />')
    (html / "search.html").write_text(page("Search", "", up=""))
    (html / "_static" / "custom.css").write_text("body {}")
    (html / "_images" / "figure.png").write_bytes(PNG)
    (html / "nbs" / "index.html").write_text(page("Index", '<a href="01_one.html#attention">attention</a>'))
    (html / "nbs" / "01_one.html").write_text(page("One", """
<section id="attention"><h2>Attention</h2><img src="../_images/figure.png" alt="a figure" />
<a href="../book/references.html#vaswani2017">[1]</a> <a href="https://arxiv.org/abs/1706.03762">paper</a>
<a href="#">top</a> <a href="mailto:someone@example.com">mail</a></section>"""))
    (html / "book" / "references.html").write_text(page("References", '<div id="vaswani2017">Vaswani et al.</div>'))
    toc = tmp_path / "_toc.yml"
    toc.write_text(TOC)
    return html, toc


def test_a_good_book_passes(book, capsys):
    html, toc = book
    problems, counts = check(html, toc)
    assert problems == [] and counts["images"] == 1 and counts["anchors"] >= 3
    assert main([str(html), "--toc", str(toc)]) == 0 and "no problems" in capsys.readouterr().out


def test_each_kind_of_break_is_named(book, capsys):
    html, toc = book
    (html / "_images" / "figure.png").unlink()
    one = html / "nbs" / "01_one.html"
    one.write_text(one.read_text().replace('href="../book/references.html#vaswani2017"', 'href="../book/references.html#nope"')
                   .replace('href="#">top', 'href="02_two.html">next'))
    shutil.copy(one, html / "nbs" / "99_orphan.html")            # built but in neither the toc nor the navigation
    (html / "book" / "references.html").rename(html / "book" / "bibliography.html")   # a toc entry not built
    problems, _ = check(html, toc)
    expected = ["nbs/01_one.html: <img> ../_images/figure.png: no such file",
                "nbs/01_one.html: <a> ../book/references.html#nope: no such file",
                "nbs/01_one.html: <a> 02_two.html: no such file",
                "_toc.yml: book/references was not built (no book/references.html)",
                "book/bibliography.html: built, but not in _toc.yml",
                "nbs/99_orphan.html: built, but not in _toc.yml",
                "nbs/99_orphan.html: not in the navigation of nbs/index.html"]
    assert set(expected) <= set(problems), problems
    assert main([str(html), "--toc", str(toc)]) == 1 and "check_links: nbs/01_one.html" in capsys.readouterr().err


def test_a_missing_anchor_and_an_empty_image(book):
    html, toc = book
    (html / "_images" / "figure.png").write_bytes(b"")
    index = html / "nbs" / "index.html"
    index.write_text(index.read_text().replace("01_one.html#attention", "01_one.html#attn"))
    problems, _ = check(html, toc)
    assert sorted(problems) == ["nbs/01_one.html: <img> ../_images/figure.png: the image is empty",
                                "nbs/index.html: <a> 01_one.html#attn: nbs/01_one.html has no id 'attn'"]


def test_no_book_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2 and "make book" in capsys.readouterr().err
