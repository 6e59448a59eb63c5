"""Check that the built book shows no broken chapter: no page holds a cell's traceback, and no execution report is
left in the site. Run after the build, on its HTML:

    python book/check_pages.py [HTML_DIR (_build/html)]

myst-nb renders a cell's error as a block with the classes `output traceback`; a traceback can also reach a page as
printed text. When a notebook fails to execute, myst-nb writes its log to `reports/<page>.err.log` inside the HTML
folder, which would otherwise be published with the site. Exit status 1 names every such page and report.
"""
import argparse
import re
import sys
from pathlib import Path

TRACEBACK_BLOCK = re.compile(r'class="[^"]*\boutput traceback\b')
TRACEBACK_TEXT = "Traceback (most recent call last)"


def problems(html_dir: Path) -> list[str]:
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        relative = page.relative_to(html_dir)
        if relative.parts[0] in {"_static", "_sources", "reports"}:
            continue
        text = page.read_text(encoding="utf-8", errors="replace")
        if TRACEBACK_BLOCK.search(text) or TRACEBACK_TEXT in text:
            found.append(f"{relative}: shows a traceback")
    reports = html_dir / "reports"
    if reports.is_dir():
        for report in sorted(p for p in reports.rglob("*") if p.is_file()):
            first = next(iter(report.read_text(encoding="utf-8", errors="replace").splitlines()), "")
            found.append(f"{report.relative_to(html_dir)}: an execution report ({first.strip()[:120]})")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", nargs="?", default="_build/html", type=Path)
    args = parser.parse_args(argv)
    if not args.html_dir.is_dir():
        print(f"{args.html_dir} is not a folder: build the book first (make book)", file=sys.stderr)
        return 2
    found = problems(args.html_dir)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"{len(found)} problem(s): a chapter failed to run; fix it rather than publish it", file=sys.stderr)
        return 1
    print(f"no tracebacks, no execution reports in {args.html_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
