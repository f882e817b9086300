"""Execute a notebook with a real Jupyter kernel and write its outputs as one HTML page.

Usage: .venv/bin/python tools/run_notebook.py [NOTEBOOK] [--out DIR]

Runs every cell of NOTEBOOK (default ``examples/tutorial.ipynb``) in a fresh
``python3`` kernel started in the notebook's folder, stops at the first cell
that raises, and writes to DIR (default ``out/tutorial``):

- ``<name>.ipynb``: the executed copy, with outputs (never committed: outputs
  are produced, not stored);
- ``<name>.html``: the cells' sources and outputs as a standalone page (HTML
  outputs such as ``TraceView`` as they are, images inline), for
  ``tools/check_html.py`` or a browser.

Needs the ``notebook`` extra: ``.venv/bin/pip install -e '.[notebook]'``.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "examples" / "tutorial.ipynb"


def execute(notebook: Path, *, timeout: float = 900.0):
    """The notebook after running it top to bottom in a fresh kernel.

    Raises ``nbclient.exceptions.CellExecutionError`` (the failing cell's source
    and traceback in its message) when a cell raises.
    """
    import nbformat  # noqa: PLC0415 (the notebook extra)
    from nbclient import NotebookClient  # noqa: PLC0415

    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}})
    client.execute()
    return nb


def _output_html(output) -> str:
    data = output.get("data", {})
    if output.output_type == "stream":
        return f'<pre class="stream">{html.escape(output.text)}</pre>'
    if output.output_type == "error":
        return f'<pre class="error">{html.escape(chr(10).join(output.traceback))}</pre>'
    if "text/html" in data:
        return f'<div class="html-output">{data["text/html"]}</div>'
    if "image/png" in data:
        return f'<img class="png-output" src="data:image/png;base64,{data["image/png"].strip()}">'
    if "text/plain" in data:
        return f'<pre class="text-output">{html.escape(data["text/plain"])}</pre>'
    return ""


def outputs_page(nb, title: str) -> str:
    """A standalone page: each cell's source (markdown as preformatted text) and outputs."""
    parts = []
    for index, cell in enumerate(nb.cells):
        source = html.escape(cell.source)
        parts.append(f'<section class="cell {cell.cell_type}" data-cell="{index}">'
                     f'<pre class="source">{source}</pre>')
        for output in cell.get("outputs", []):
            parts.append(_output_html(output))
        parts.append("</section>")
    body = "\n".join(parts)
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n"
            "<style>pre.source { background: #f6f6f6; padding: 6px; }</style>\n"
            f"</head>\n<body>\n{body}\n</body>\n</html>\n")


def write(nb, out: Path, name: str) -> tuple[Path, Path]:
    """Write the executed copy and its page to ``out``; returns their paths."""
    import nbformat  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    executed = out / f"{name}.ipynb"
    page = out / f"{name}.html"
    nbformat.write(nb, executed)
    page.write_text(outputs_page(nb, name), encoding="utf-8")
    return executed, page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path, nargs="?", default=TUTORIAL)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "tutorial")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    options = parser.parse_args(argv)
    try:
        from nbclient.exceptions import CellExecutionError  # noqa: PLC0415
    except ImportError:
        print("error: nbclient is missing; install the notebook extra with "
              ".venv/bin/pip install -e '.[notebook]'", file=sys.stderr)
        return 2
    try:
        nb = execute(options.notebook.resolve(), timeout=options.timeout)
    except CellExecutionError as error:
        print(f"error: a cell of {options.notebook} failed:\n{error}", file=sys.stderr)
        return 1
    executed, page = write(nb, options.out, options.notebook.stem)
    print(f"executed copy: {executed}\noutputs page:  {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
