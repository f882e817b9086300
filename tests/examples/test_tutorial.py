"""examples/tutorial.ipynb, executed by a real Jupyter kernel and looked at in headless Chromium.

The notebook runs top to bottom in a fresh ``python3`` kernel (nbclient); a cell
that raises fails every test here with that cell's source and traceback.  The
executed copy and its outputs page are written to a temporary folder, or to
``$LENS_ROME_TUTORIAL_OUT`` when set (never into examples/: outputs are produced,
not stored).  The views are then rendered by Chromium with the network blocked,
and the DOM its scripts built is read back.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import check_html  # noqa: E402 (tools/)
import run_notebook  # noqa: E402

pytestmark = [pytest.mark.embedded, pytest.mark.xdist_group("tutorial")]

RENDER_CALL = re.compile(r'CircuitsVis\.render\("([^"]+)", CircuitsVis\.(\w+), (\{.*\})\);')
WHITE = "rgb(255, 255, 255)"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(the executed notebook, the folder holding its copy and outputs page)."""
    try:
        from nbclient.exceptions import CellExecutionError  # noqa: PLC0415
    except ImportError:
        pytest.fail("nbclient is missing: install the notebook extra with "
                    "`.venv/bin/pip install -e '.[notebook]'` (make test does)", pytrace=False)
    out = Path(os.environ.get("LENS_ROME_TUTORIAL_OUT") or tmp_path_factory.mktemp("tutorial"))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    with pytest.MonkeyPatch.context() as patch:  # the kernel inherits this environment
        patch.setenv("OMP_NUM_THREADS", threads)
        patch.setenv("MKL_NUM_THREADS", threads)
        try:
            nb, failure = run_notebook.execute(run_notebook.TUTORIAL), None
        except CellExecutionError as error:
            failure = ANSI.sub("", str(error))  # IPython colours its tracebacks
    if failure:  # outside the except: the traceback is reported once, without colours
        pytest.fail(f"a cell of {run_notebook.TUTORIAL.name} failed:\n{failure}", pytrace=False)
    run_notebook.write(nb, out, "tutorial")
    print(f"executed tutorial: {out}")
    return nb, out


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def stream_text(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream")


def cell_with(nb, needle: str):
    matches = [cell for cell in code_cells(nb) if needle in cell.source]
    assert len(matches) == 1, f"expected one code cell containing {needle!r}, found {len(matches)}"
    return matches[0]


def trace_views(nb) -> list[tuple[str, str, dict]]:
    """(HTML fragment, widget id, circuitsvis props) of each view the notebook displayed."""
    views = []
    for cell in code_cells(nb):
        for output in cell.outputs:
            fragment = output.get("data", {}).get("text/html", "")
            call = RENDER_CALL.search(fragment)
            if call:
                views.append((fragment, call.group(1), json.loads(call.group(3))))
    return views


def test_every_code_cell_ran_without_an_error(executed):
    nb, _ = executed
    cells = code_cells(nb)
    assert len(cells) >= 12
    for index, cell in enumerate(cells):
        assert cell.execution_count is not None, f"code cell {index} did not run"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"code cell {index} raised {errors[0].ename}"
    # the revert check printed True, not just ran
    assert "reverted bit for bit: True" in stream_text(cell_with(nb, "change.revert()"))


def test_the_sae_from_sae_lens_is_spliced_in_exactly(executed):
    nb, _ = executed
    fitted = stream_text(cell_with(nb, "StandardSAE("))
    explained = float(re.search(r"variance explained ([0-9.]+)", fitted).group(1))
    assert explained > 0.5, fitted
    spliced = stream_text(cell_with(nb, "model.add_hook(HOOK, splice)"))
    # with the error term the model computes the same function: the trace barely moves
    difference = float(re.search(r"largest difference from the trace without it (\S+)",
                                 spliced).group(1))
    assert difference < 1e-4, spliced
    latents = stream_text(cell_with(nb, "latent_splice("))
    assert "exact effect" in latents and "estimate" in latents, latents


def test_the_heatmaps_are_images_with_content(executed):
    import matplotlib.image  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    nb, _ = executed
    images = [o.data["image/png"] for cell in code_cells(nb) for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # three kinds, swap, heads, dataset, SAE trace
    for encoded in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(encoded)), format="png")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
        assert len(colours) > 20, "a heatmap has more than a few flat colours"


def drawn_tokens(props: dict) -> list[str]:
    """The view's tokens as the browser shows them (props hold them HTML-escaped; blank ones
    draw no text)."""
    tokens = [check_html.normalize(html.unescape(token)) for token in props["tokens"]]
    return [token for token in tokens if token]


def contains_in_order(texts: list[str], wanted: list[str]) -> bool:
    return any(texts[i:i + len(wanted)] == wanted for i in range(len(texts) - len(wanted) + 1))


def test_the_views_render_in_chromium(executed):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH: `apt-get update && apt-get install -y chromium` "
                    "(.ci/run installs it) to render the notebook's views")
    nb, out = executed
    views = trace_views(nb)
    assert views, "the notebook displayed no circuitsvis view"

    page = out / "tutorial.html"  # every cell and output, as the notebook shows them
    rendered = check_html.render(page, chromium, timeout=300)
    assert len(rendered.images) >= 5 and all(src.startswith("data:image/png;base64,")
                                             for src in rendered.images)
    for fragment, widget, props in views:
        assert widget in rendered.cells, f"Chromium did not keep widget {widget}"
        cells = rendered.cells[widget]
        texts = [text for text, _ in cells]
        tokens = drawn_tokens(props)
        # the widget's JavaScript drew the prompt's tokens, in order
        assert contains_in_order(texts, tokens), (tokens, texts)
        # ... each on a coloured background: a heatmap over the tokens, not flat text
        backgrounds = [background for text, background in cells if text in tokens]
        assert all(b.startswith("rgb") for b in backgrounds), backgrounds
        assert len(set(backgrounds)) >= 3 and set(backgrounds) != {WHITE}, backgrounds
        # one button per layer (or head) to select which scores colour the tokens
        labels = props.get("labels") or []
        assert labels and all(label in texts for label in labels[:3])
        # the header states the prompt
        assert re.search(r"prompt: <code>[^<]+</code>", fragment)

    first, widget, props = views[0]
    view = out / "trace_view.html"
    view.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{first}"
                    f"</body></html>", encoding="utf-8")
    shot = out / "trace_view.png"
    alone = check_html.render(view, chromium, screenshot=shot, timeout=300)
    assert shot.stat().st_size > 10_000
    assert contains_in_order([t for t, _ in alone.cells[widget]], drawn_tokens(props))
    print(f"screenshot of the first trace view: {shot}")
