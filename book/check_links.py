"""Check the built book offline (`make book` runs it on _build/html): every internal link and anchor resolves, every
image, stylesheet and script a page uses is there (images not empty), and the pages built are exactly the table of
contents — each `_toc.yml` entry built, each built page listed in the navigation. External links are not fetched.

    python book/check_links.py [HTML_DIR (_build/html)] [--toc _toc.yml]
"""
import argparse
import re
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# (tag, attribute) pairs that point at another file; srcset holds several "URL width" entries
LINKING = {("a", "href"), ("link", "href"), ("img", "src"), ("script", "src"), ("source", "src"), ("source", "srcset"),
           ("img", "srcset"), ("iframe", "src"), ("video", "src"), ("audio", "src"), ("object", "data"),
           ("image", "href"), ("image", "xlink:href"), ("use", "href"), ("use", "xlink:href")}
IMAGES = {"img", "image", "source"}
NOT_PAGES = {"search.html", "genindex.html", "py-modindex.html"}   # Sphinx's own pages, in no table of contents
NOT_PAGE_DIRS = {"_static", "_sources", "_images", "_downloads", "_sphinx_design_static"}
EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//)")   # http:, https:, mailto:, data:, javascript:, //host


@dataclass
class Page:
    ids: set = field(default_factory=set)
    links: list = field(default_factory=list)   # (tag, url)
    navigation: list = field(default_factory=list)   # hrefs inside the sidebar's table of contents
    redirect: str | None = None


class _Reader(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.page, self.open_navs = Page(), []   # a stack of "is this <nav> the table of contents?"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.page.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.page.ids.add(attrs["name"])
        if tag == "nav":
            self.open_navs.append("bd-docs-nav" in (attrs.get("class") or "").split())
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh":
            found = re.search(r"url=(.+)", attrs.get("content") or "", re.I)
            if found:
                self.page.redirect = found.group(1).strip()
                self.page.links.append(("meta", self.page.redirect))
        for name, value in attrs.items():
            if (tag, name) in LINKING and value:
                urls = [part.split()[0] for part in value.split(",") if part.strip()] if name == "srcset" else [value]
                self.page.links += [(tag, url) for url in urls]
                if tag == "a" and any(self.open_navs):
                    self.page.navigation.append(value)

    def handle_endtag(self, tag):
        if tag == "nav" and self.open_navs:
            self.open_navs.pop()


def read_page(path: Path) -> Page:
    reader = _Reader()
    reader.feed(path.read_text(encoding="utf-8", errors="replace"))
    return reader.page


def _target(html: Path, page: Path, url: str) -> tuple[Path, str]:
    """The file a relative URL on `page` names, and its fragment."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    if not path:
        return page, unquote(parts.fragment)
    target = (html / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
    target = Path(*target.parts).resolve()
    if target.is_dir():
        target = target / "index.html"
    return target, unquote(parts.fragment)


def toc_files(toc: Path) -> list[str]:
    """The documents a Jupyter Book _toc.yml lists (root first), as paths without their suffix."""
    import yaml

    data = yaml.safe_load(toc.read_text(encoding="utf-8"))
    found = [data["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in data.items() if k != "root"})
    return [str(Path(f).with_suffix("")) for f in found]


def check(html: Path, toc: Path | None = None) -> tuple[list[str], dict]:
    """Problems found in the HTML tree (empty: all good) and what was counted."""
    html = html.resolve()
    files = sorted(html.rglob("*.html"))
    pages = {p: read_page(p) for p in files if not (set(p.relative_to(html).parts[:-1]) & NOT_PAGE_DIRS)}
    problems, counts = [], {"pages": len(pages), "links": 0, "anchors": 0, "images": 0}
    for path, page in pages.items():
        where = path.relative_to(html)
        for tag, url in page.links:
            if EXTERNAL.match(url) or url == "#":
                continue
            target, fragment = _target(html, path, url)
            counts["links"] += 1
            if not target.is_file() or not target.is_relative_to(html):
                problems.append(f"{where}: <{tag}> {url}: no such file")
                continue
            if tag in IMAGES:
                counts["images"] += 1
                if target.stat().st_size == 0:
                    problems.append(f"{where}: <{tag}> {url}: the image is empty")
            if fragment and target.suffix == ".html":
                counts["anchors"] += 1
                ids = pages[target].ids if target in pages else read_page(target).ids
                if fragment not in ids:
                    problems.append(f"{where}: <{tag}> {url}: {target.relative_to(html)} has no id {fragment!r}")
    problems += _toc_problems(html, pages, toc)
    return list(dict.fromkeys(problems)), counts   # a page's sidebar and its text may repeat a broken link


def _toc_problems(html: Path, pages: dict, toc: Path | None) -> list[str]:
    content = {p for p, page in pages.items() if page.redirect is None and p.name not in NOT_PAGES}
    if not content:
        return [f"{html}: no pages"]
    problems = []
    if toc is not None:
        listed = toc_files(toc)
        built = {html / f"{name}.html" for name in listed}
        problems += [f"{toc.name}: {name} was not built (no {name}.html)" for name in listed
                     if html / f"{name}.html" not in content]
        problems += [f"{p.relative_to(html)}: built, but not in {toc.name}" for p in sorted(content - built)]
        root = html / f"{listed[0]}.html"
    else:
        root = min(content, key=lambda p: (len(p.relative_to(html).parts), p.name != "index.html"))
    if root in pages:   # the sidebar of the root page lists every other page of the table of contents
        navigated = {root} | {_target(html, root, url)[0] for url in pages[root].navigation
                              if not EXTERNAL.match(url)}
        problems += [f"{p.relative_to(html)}: not in the navigation of {root.relative_to(html)}"
                     for p in sorted(content - navigated)]
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("html", nargs="?", default="_build/html", type=Path, help="the built book (default: _build/html)")
    p.add_argument("--toc", type=Path, default=None, help="the _toc.yml the book was built from")
    args = p.parse_args(argv)
    if not args.html.is_dir():
        print(f"check_links: no folder {args.html}; build the book first (make book)", file=sys.stderr)
        return 2
    problems, counts = check(args.html, args.toc)
    for problem in problems:
        print(f"check_links: {problem}", file=sys.stderr)
    summary = ", ".join(f"{n} {what}" for what, n in counts.items())
    print(f"check_links: {summary} checked; {len(problems) or 'no'} problem{'s' * (len(problems) != 1)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
