"""Render an HTML view in headless Chromium, offline, and check that tokens were drawn.

Usage: .venv/bin/python tools/check_html.py FILE [TOKEN ...] [--screenshot PNG]

Prints the page's visible text as Chromium rendered it (scripts run, network
blocked), then checks that every TOKEN is the text of an element inside a
circuitsvis widget (``<div id="circuits-vis-...">``).  Those divs are empty in
the file, so anything found inside them was created by the JavaScript, not
read from the script's JSON props.  Exits 0 when every token is rendered, 1
when one is missing, 2 when Chromium cannot run.

Chromium: ``apt-get update && apt-get install -y chromium``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

HIDDEN_TAGS = {"script", "style", "head", "title", "noscript", "template"}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
             "source", "track", "wbr"}
WIDGET_ID_PREFIX = "circuits-vis-"
BACKGROUND = re.compile(r"background-color:\s*([^;]+)")


def chromium_command(chromium: str, profile: str) -> list[str]:
    return [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
        # Any network request fails, so a page that renders here renders offline.
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ]


class RenderedText(HTMLParser):
    """Visible text of a DOM dump, and the texts of elements inside circuitsvis widgets."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        # (tag, hidden, the widget it is inside or "", its background colour or "")
        self.stack: list[tuple[str, bool, str, str]] = []
        self.page_text: list[str] = []
        self.widgets: list[str] = []
        # per widget id: (own text, background-color) of each element inside it with text
        self.cells: dict[str, list[tuple[str, str]]] = {}
        self.images: list[str] = []  # src of each <img>

    def handle_starttag(self, tag, attrs):
        hidden, widget = self.stack[-1][1:3] if self.stack else (False, "")
        attributes = dict(attrs)
        element_id = attributes.get("id") or ""
        if element_id.startswith(WIDGET_ID_PREFIX):
            self.widgets.append(element_id)
            self.cells[element_id] = []
            widget = element_id
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        if tag in {"div", "p", "br", "tr", "li", "h1", "h2", "h3", "table"}:
            self.page_text.append("\n")
        if tag not in VOID_TAGS:
            background = BACKGROUND.search(attributes.get("style") or "")
            self.stack.append((tag, hidden or tag in HIDDEN_TAGS, widget,
                               background.group(1).strip() if background else ""))

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth][0] == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        if not self.stack or self.stack[-1][1]:
            return
        self.page_text.append(data)
        _, _, widget, background = self.stack[-1]
        if widget and data.strip():
            self.cells[widget].append((normalize(data), background))

    @property
    def widget_texts(self) -> list[str]:
        """Own text of each element inside a widget, all widgets in page order."""
        return [text for cells in self.cells.values() for text, _ in cells]

    def visible_text(self) -> str:
        lines = "".join(self.page_text).replace("\xa0", " ").splitlines()
        return "\n".join(" ".join(line.split()) for line in lines if line.strip())


def normalize(text: str) -> str:
    """Token text as a browser shows it: circuitsvis writes spaces as &nbsp;."""
    return " ".join(text.replace("\xa0", " ").split())


def run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


class ChromiumError(RuntimeError):
    """Chromium did not run, or returned no DOM or no screenshot."""


def render(page: Path, chromium: str, *, screenshot: Path | None = None,
           window_size: str = "1000,700", timeout: float = 120.0) -> RenderedText:
    """The DOM of ``page`` after Chromium ran its scripts (offline), parsed.

    Also saves a PNG of the page's first ``window_size`` pixels to ``screenshot``.
    """
    with tempfile.TemporaryDirectory(prefix="check_html_") as profile:
        base = chromium_command(chromium, profile)
        dump = run_chromium([*base, "--dump-dom", page.resolve().as_uri()], timeout)
        if dump.returncode != 0 or not dump.stdout.strip():
            raise ChromiumError(f"Chromium exited {dump.returncode} without a DOM:\n"
                                f"{dump.stderr[-2000:]}")
        if screenshot:
            shot = screenshot.resolve()
            capture = run_chromium(
                [*base, "--hide-scrollbars", f"--window-size={window_size}",
                 f"--screenshot={shot}", page.resolve().as_uri()], timeout)
            if capture.returncode != 0 or not shot.is_file():
                raise ChromiumError(f"screenshot failed ({capture.returncode}):\n"
                                    f"{capture.stderr[-2000:]}")
    rendered = RenderedText()
    rendered.feed(dump.stdout)
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="HTML file to render")
    parser.add_argument("tokens", nargs="*", help="token texts that must be rendered")
    parser.add_argument("--screenshot", type=Path, help="also save a PNG screenshot here")
    parser.add_argument("--window-size", default="1000,700", help="WIDTH,HEIGHT (screenshot)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per Chromium run")
    options = parser.parse_args(argv)

    page = options.file.resolve()
    if not page.is_file():
        print(f"error: {page} is not a file", file=sys.stderr)
        return 2
    if not Path(options.chromium).exists():
        print(f"error: no Chromium at {options.chromium}; install it with "
              f"'apt-get update && apt-get install -y chromium'", file=sys.stderr)
        return 2

    try:
        rendered = render(page, options.chromium, screenshot=options.screenshot,
                          window_size=options.window_size, timeout=options.timeout)
    except ChromiumError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("--- visible text ---")
    print(rendered.visible_text())
    print("--- widgets ---")
    print(f"{len(rendered.widgets)} circuitsvis widget(s): {', '.join(rendered.widgets) or '-'}; "
          f"{len(rendered.widget_texts)} rendered text node(s) inside them")
    if options.screenshot:
        print(f"screenshot: {options.screenshot}")

    missing = []
    for token in options.tokens:
        wanted = normalize(token)
        found = bool(wanted) and wanted in rendered.widget_texts
        print(f"{'ok     ' if found else 'MISSING'} {token!r}")
        if not found:
            missing.append(token)
    if missing:
        print(f"{len(missing)} of {len(options.tokens)} token(s) not rendered by the widget")
        return 1
    print(f"all {len(options.tokens)} token(s) rendered by the widget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
