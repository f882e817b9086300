"""The ``make demo`` job: causal traces of three facts on the embedded SmolLM2-135M.

    python -m lens_rome.cli.demo --out demo_output [--samples 10]

For each fact it traces hidden states, MLP outputs and attention outputs (the
three panels of the paper's Figure 1) and writes, in one subfolder per fact,
the heatmaps (``trace_<kind>.png`` and ``overview.png`` with all three), the
offline interactive views (``trace_<kind>.html``) and the results
(``trace_<kind>.json``, reloadable with ``lens_rome.TraceResult.load``), plus
an ``index.html`` linking everything.  It prints the clean and corrupted
probabilities and the top restoration sites per kind.

The facts are our own, chosen because SmolLM2-135M answers them correctly.
The demo replaces its own earlier output; it refuses to write into a folder
that is not empty and was not made by the demo.
"""

from __future__ import annotations

import argparse
import html
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lens_rome.cli import arguments
from lens_rome.cli.arguments import command, positive_int
from lens_rome.errors import InputError
from lens_rome.tracing.kinds import KINDS

if TYPE_CHECKING:
    from lens_rome.tracing.result import TraceResult

MODEL = "smollm2-135m"
MARKER = ".lens_rome_demo"


@dataclass(frozen=True)
class Fact:
    name: str  # the subfolder
    prompt: str
    subject: str
    target: str


# SmolLM2-135M gives each answer the highest probability on the clean prompt
# (0.70, 0.85 and 0.62), so corrupting the subject has something to destroy.
FACTS = (
    Fact("eiffel_tower", "The Eiffel Tower is located in the city of", "The Eiffel Tower",
         " Paris"),
    Fact("colosseum", "The Colosseum is in the city of", "The Colosseum", " Rome"),
    Fact("vladimir_putin", "The mother tongue of Vladimir Putin is", "Vladimir Putin",
         " Russian"),
)


def prepare_folder(out: Path) -> None:
    """Create ``out`` for the demo, or reuse it if an earlier demo made it.

    Anything else (a file, or a non-empty folder without the demo's marker)
    is refused, so the demo only ever replaces its own files.
    """
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise InputError(
                f"--out {out} is a non-empty folder that the demo did not create (it has no "
                f"{MARKER} file); choose another --out, or empty it first"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m lens_rome.cli.demo; its files may be replaced\n")


def write_overview(results: Sequence[TraceResult], path: Path) -> Path:
    """The three kinds side by side, like the paper's Figure 1."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (heavy import after parsing)

    n_tokens = len(results[0].tokens)
    figure = Figure(figsize=(5 * len(results), 1.2 + 0.26 * n_tokens), layout="constrained")
    for ax, result in zip(figure.subplots(1, len(results)), results):
        result.plot(ax=ax)
        if ax is not figure.axes[0]:
            ax.set_yticklabels([])
    figure.suptitle(f"{results[0].prompt} -> {results[0].answer!r}")
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    tmp.replace(path)
    return path


def write_index(out: Path, rows: list[tuple[Fact, dict[str, dict[str, Path]]]]) -> Path:
    """``index.html``: one section per fact, linking its views and showing its overview."""
    parts = ["<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
             "<title>lens_rome demo</title></head>\n<body style=\"font-family: sans-serif\">",
             f"<h1>lens_rome causal tracing demo ({MODEL})</h1>"]
    for fact, paths in rows:
        links = " &middot; ".join(
            f'<a href="{html.escape(p["html"].relative_to(out).as_posix())}">{kind} view</a>'
            for kind, p in paths.items()
        )
        overview = html.escape(f"{fact.name}/overview.png")
        parts.append(f"<h2>{html.escape(fact.prompt)} &rarr; <code>{html.escape(fact.target)}"
                     f"</code></h2>\n<p>subject: <code>{html.escape(fact.subject)}</code> "
                     f"&middot; {links}</p>\n<img src=\"{overview}\" style=\"max-width: 100%\">")
    parts.append("</body></html>\n")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def run(out: Path, samples: int) -> None:
    """Trace the demo's facts on :data:`MODEL` and write their files under ``out``."""
    from tqdm.auto import tqdm  # noqa: PLC0415 (heavy import after parsing)

    from lens_rome.cli.output import report, write_trace  # noqa: PLC0415 (heavy import after parsing)
    from lens_rome.tracing.engine import trace  # noqa: PLC0415 (heavy import after parsing)

    start = time.perf_counter()
    prepare_folder(out)
    model = arguments.load(MODEL)
    print(f"lens_rome demo: causal traces on {MODEL}, {samples} noise samples, "
          f"output in {out}/")
    rows = []
    bar = tqdm(total=len(FACTS) * len(KINDS), desc="demo", unit="trace")
    for fact in FACTS:
        folder = out / fact.name
        results, paths = [], {}
        for kind in KINDS:
            bar.set_postfix_str(f"{fact.name} {kind}")
            result = trace(model, fact.prompt, fact.subject, kind, samples=samples,
                           target=fact.target, progress=True)
            paths[kind] = write_trace(result, folder, overwrite=True)
            results.append(result)
            bar.update()
        overview = write_overview(results, folder / "overview.png")
        rows.append((fact, paths))
        tokens = "|".join(results[0].tokens)
        s, e = results[0].subject_range
        text = [f"\n{fact.prompt!r} -> {fact.target!r}  (subject {fact.subject!r}: tokens "
                f"{s}..{e - 1} of {tokens})"]
        text += [report(result, indent="  ") for result in results]
        text.append(f"  files: {folder}/trace_<kind>.png|html|json, {overview}")
        tqdm.write("\n".join(text))
    bar.close()
    index = write_index(out, rows)
    print(f"\ndone in {time.perf_counter() - start:.0f} s; open {index} to browse all traces")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lens_rome.cli.demo",
        description=f"Causal traces (hidden, MLP, attention) of {len(FACTS)} facts on the "
                    f"embedded {MODEL}, offline.  Writes PNG heatmaps, HTML views and JSON "
                    f"results in one subfolder per fact, and index.html.",
        epilog="The demo replaces the files of an earlier demo run in --out.  It refuses a "
               "non-empty --out that it did not create, so it never overwrites anything else.",
    )
    parser.add_argument("--out", default="demo_output", metavar="DIR",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--samples", type=positive_int, default=10, metavar="N",
                        help="noise draws per trace (default: %(default)s, as in the paper)")
    return parser


@command
def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (2 for bad input)."""
    run(Path(args.out), args.samples)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lens_rome.cli.demo``: returns the exit status (2 for bad input)."""
    return run_demo(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
