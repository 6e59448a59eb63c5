"""Open the built book in headless Chromium (`make book` runs it after check_links.py) and check each page of the table
of contents as a reader sees it: a title, code cells with outputs, figures decoded to a non-zero size, Markdown tables
rendered as tables, every formula typeset by MathJax (no raw TeX), and no JavaScript errors; code cells with a line
wider than the column (which scroll sideways) are counted, as a note. Each page's first screen is saved as a PNG (outside the repository: --screenshots).

The book is served from 127.0.0.1 and the browser can resolve no other host, so a page that needs the internet (a
script or a font from a CDN) fails here as it would for a reader offline.

    python book/check_browser.py [HTML_DIR (_build/html)] [--toc _toc.yml] [--screenshots DIR] [--browser PATH]

It talks to the browser over the DevTools protocol on a pipe (--remote-debugging-pipe): nothing beyond the standard
library and a Chromium or Chrome on the PATH (Debian's `chromium`; `make browser` installs it).
"""
import argparse
import base64
import fcntl
import functools
import http.server
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chromium-headless-shell")
WIDTH, HEIGHT = 1440, 1000   # a laptop's window, in CSS pixels

# What a page shows, read in the page once it has loaded and MathJax has finished. Returned as JSON to `problems`.
FACTS_JS = r"""
(() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const h1 = article.querySelector('h1');
  const inputs = [...article.querySelectorAll('div.cell')].filter(c => c.querySelector('.cell_input'));
  const output = c => [...c.querySelectorAll('.cell_output')].some(o => o.textContent.trim() || o.querySelector('img'));
  const skip = {acceptNode: n => n.parentElement.closest('pre, code, mjx-container, script, style')
                                 ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT};
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT, skip);
  const rawTex = [];
  for (let n; (n = walker.nextNode());) if (/\\\(|\\\[|\$\$/.test(n.nodeValue)) rawTex.push(n.nodeValue.trim());
  const shown = e => e.getClientRects().length > 0;
  const codes = [...article.querySelectorAll('div.cell_input pre')].filter(shown);
  const probe = document.createElement('span');
  probe.textContent = 'x'.repeat(100);
  if (codes.length) { codes[0].appendChild(probe); }
  const charWidth = codes.length ? probe.getBoundingClientRect().width / 100 : 0;
  probe.remove();
  return {
    title: document.title,
    h1: h1 ? h1.textContent.replace(/[#¶]\s*$/, '').trim() : '',
    codeCells: inputs.length,
    outputs: inputs.filter(output).length,
    images: [...article.querySelectorAll('img')].map(i => ({src: i.getAttribute('src') || '', complete: i.complete,
                                                           width: i.naturalWidth, height: i.naturalHeight})),
    tables: article.querySelectorAll('table').length,
    pipeParagraphs: [...article.querySelectorAll('p')].map(p => p.textContent.trim())
                      .filter(t => /^\|.*\|/.test(t) && /\|\s*:?-{3,}/.test(t)),
    math: article.querySelectorAll('.math').length,
    untypeset: [...article.querySelectorAll('.math')].filter(m => !m.querySelector('mjx-container'))
                 .map(m => m.textContent.trim()),
    rawTex,
    codeColumn: codes.length ? Math.floor(codes[0].clientWidth / charWidth) : 0,
    scrolling: codes.filter(p => p.scrollWidth > p.clientWidth + 1)
                 .map(p => p.textContent.split('\n').reduce((a, b) => (b.length > a.length ? b : a), '')),
  };
})()
"""

# Resolves once MathJax (when the page loads it) has typeset the page: its script is deferred, so it may not have
# started when the load event fires.
MATHJAX_DONE_JS = r"""
(async () => {
  if (!document.querySelector('script[src*="mathjax"]')) return 'none';
  for (let i = 0; i < 200 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++)
    await new Promise(r => setTimeout(r, 50));
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return 'not started';
  await MathJax.startup.promise;
  return 'typeset';
})()
"""


def problems(facts: dict) -> list[str]:
    """What is wrong with a page, from the facts FACTS_JS read in it and the errors the browser reported."""
    found = []
    if not facts.get("h1"):
        found.append("no title (no <h1> in the article)")
    if facts.get("codeCells") and not facts.get("outputs"):
        found.append(f"{facts['codeCells']} code cells and not one output (were the notebooks executed?)")
    external = {image.get("src") for image in facts.get("images", []) if _external(image.get("src", ""))}
    for image in facts.get("images", []):
        if image.get("src") in external:
            continue
        if not image.get("complete") or not image.get("width") or not image.get("height"):
            found.append(f"figure {image.get('src')!r} did not load ({image.get('width')}×{image.get('height')})")
    for text in facts.get("pipeParagraphs", []):
        found.append(f"a Markdown table shown as text, not a table: {_short(text)}")
    if facts.get("mathjax") == "not started":
        found.append("MathJax is linked but never started (is its script served?)")
    for tex in facts.get("untypeset", []):
        found.append(f"math not typeset: {_short(tex)}")
    for text in facts.get("rawTex", []):
        found.append(f"raw TeX in the text: {_short(text)}")
    for error in facts.get("errors", []):
        if not any(error.startswith("Failed to load resource") and error.endswith(" " + url) for url in external):
            found.append(f"JavaScript: {_short(error, 200)}")
    return found


def _external(url: str) -> bool:
    """A URL on another host: not fetched here (the browser resolves 127.0.0.1 only), as check_links.py doesn't."""
    return bool(re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*:)?//", url)) and not re.match(r"^https?://127\.0\.0\.1[:/]", url)


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def pages_to_check(html: Path, toc: Path | None) -> list[Path]:
    """The pages of the table of contents (all content pages when there is none), root first."""
    if toc is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from check_links import toc_files
        return [html / f"{name}.html" for name in toc_files(toc)]
    skip = {"_static", "_sources", "_images", "_downloads", "_sphinx_design_static"}
    return sorted(p for p in html.rglob("*.html") if not set(p.relative_to(html).parts) & skip
                  and p.name not in {"search.html", "genindex.html", "py-modindex.html"})


def find_browser(name: str | None = None) -> str | None:
    for candidate in ([name] if name else [os.environ.get("CHROMIUM"), *BROWSERS]):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out: NUL-terminated JSON)."""

    def __init__(self, executable: str, timeout: float = 60.0):
        self.timeout, self.next_id, self.events = timeout, 0, []
        self.profile = tempfile.mkdtemp(prefix="llmjax-chromium-")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def fds():   # in the child: the protocol's fds 3 and 4 (copied high first, as either may be 3 or 4 already)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = [executable, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                "--mute-audio", f"--user-data-dir={self.profile}", f"--window-size={WIDTH},{HEIGHT}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "about:blank"]
        self.process = subprocess.Popen(args, close_fds=False, preexec_fn=fds,   # Python's own fds are CLOEXEC
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.messages = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=HEIGHT,
                  deviceScaleFactor=1, mobile=False)

    def _reader(self):
        buffer = b""
        while chunk := os.read(self._read, 1 << 16):
            buffer += chunk
            *whole, buffer = buffer.split(b"\0")
            for message in whole:
                self.messages.put(json.loads(message))
        self.messages.put(None)

    def _next(self, deadline: float) -> dict:
        try:
            message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("the browser did not answer in time") from None
        if message is None:
            raise RuntimeError("the browser closed its DevTools pipe (did it start? try it by hand with --headless)")
        return message

    def call(self, method: str, session: bool = False, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str):
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._next(deadline))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluating in the page: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def open(self, url: str):
        self.events = []
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")

    def errors(self) -> list[str]:
        """The JavaScript errors, console errors and failed loads since the page was opened."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                found.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())
        return found

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"]))

    def close(self):
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _quiet_handler(directory: str):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, *args):
            pass

    return Handler


def check(html: Path, toc: Path | None, screenshots: Path, browser: str) -> tuple[dict, dict]:
    """Each page's problems and facts, keyed by its path inside the book."""
    html = html.resolve()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _quiet_handler(str(html)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    chromium = Browser(browser)
    found, facts = {}, {}
    try:
        for page in pages_to_check(html, toc):
            name = page.relative_to(html).as_posix()
            if not page.is_file():
                found[name] = ["not built"]
                continue
            chromium.open(f"http://127.0.0.1:{server.server_address[1]}/{name}")
            mathjax = chromium.evaluate(MATHJAX_DONE_JS)
            facts[name] = {**chromium.evaluate(FACTS_JS), "mathjax": mathjax, "errors": chromium.errors()}
            chromium.screenshot(screenshots / (name.replace("/", "__").removesuffix(".html") + ".png"))
            found[name] = problems(facts[name])
    finally:
        chromium.close()
        server.shutdown()
    return found, facts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("html", nargs="?", default="_build/html", type=Path, help="the built book (default: _build/html)")
    p.add_argument("--toc", type=Path, default=None, help="the _toc.yml the book was built from")
    p.add_argument("--screenshots", type=Path, default=Path(tempfile.gettempdir()) / "llmjax-book-screenshots",
                   help="where each page's screenshot goes (default: %(default)s)")
    p.add_argument("--browser", default=None, help=f"Chromium or Chrome (default: $CHROMIUM or {', '.join(BROWSERS)})")
    args = p.parse_args(argv)
    if not args.html.is_dir():
        print(f"check_browser: no folder {args.html}; build the book first (make book)", file=sys.stderr)
        return 2
    browser = find_browser(args.browser)
    if browser is None:
        print("check_browser: no Chromium or Chrome found; `make browser` installs Debian's chromium", file=sys.stderr)
        return 2
    args.screenshots.mkdir(parents=True, exist_ok=True)
    found, facts = check(args.html, args.toc, args.screenshots, browser)
    for name, page_problems in found.items():
        seen = facts.get(name, {})
        print(f"check_browser: {name}: {seen.get('codeCells', 0)} code cells ({seen.get('outputs', 0)} with output), "
              f"{len(seen.get('images', []))} figures, {seen.get('tables', 0)} tables, {seen.get('math', 0)} formulas"
              f"{'' if page_problems else ' — ok'}")
        if seen.get("scrolling"):   # a note, not a failure: the chapters still hold lines wider than the column
            print(f"check_browser:   note: {len(seen['scrolling'])} code cells hold a line wider than the column "
                  f"({seen.get('codeColumn')} characters at {WIDTH} px), e.g. {_short(seen['scrolling'][0], 60)}")
        for problem in page_problems:
            print(f"check_browser:   {problem}", file=sys.stderr)
    total = sum(map(len, found.values()))
    print(f"check_browser: {len(found)} pages opened in {Path(browser).name}, screenshots in {args.screenshots}; "
          f"{total or 'no'} problem{'s' * (total != 1)}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
