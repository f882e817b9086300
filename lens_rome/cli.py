"""The ``lens-rome`` command line.

``lens-rome trace`` runs a causal trace of one fact and writes, per kind of
state, a paper-style heatmap (PNG), an offline circuitsvis view (HTML) and the
result itself (JSON, reloadable with ``TraceResult.load``)::

    lens-rome trace --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --kind all --out eiffel

It never replaces an existing file unless ``--overwrite`` is given, and it
checks that before any tracing starts.  Errors in the input (a subject that is
not in the prompt, an unknown model, ...) print ``error: ...`` and exit with
status 2.

Library code never prints; this module is where results meet the terminal.
The functions :func:`trace_paths`, :func:`check_free`, :func:`write_trace` and
:func:`report` are shared with ``python -m lens_rome.demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Sequence

from lens_rome.dataset_cli import add_trace_dataset_parser
from lens_rome.edit_cli import add_edit_parser
from lens_rome.errors import USER_ERRORS
from lens_rome.evaluate_cli import add_evaluate_parser
from lens_rome.models import DEFAULT_MODEL, EMBEDDED_MODELS
from lens_rome.tracing import KINDS, METRICS, TraceResult

log = logging.getLogger(__name__)

DEFAULT_OUT = "lens_rome_out"
PNG_DPI = 150
EXTENSIONS = ("png", "html", "json")


class CommandError(Exception):
    """A problem with the command's input, reported as ``error: ...`` with status 2."""


# --------------------------------------------------------------------------- output files


def trace_stem(kind: str, sever: str | None = None) -> str:
    """The file name stem of a trace: ``trace_hidden``, or ``trace_hidden_sever_mlp``."""
    return f"trace_{kind}" if sever is None else f"trace_{kind}_sever_{sever}"


def trace_paths(out: str | Path, kind: str, sever: str | None = None) -> dict[str, Path]:
    """The files a trace of ``kind`` is written to: ``{"png": ..., "html": ..., "json": ...}``."""
    stem = trace_stem(kind, sever)
    return {ext: Path(out) / f"{stem}.{ext}" for ext in EXTENSIONS}


def check_free(paths: Sequence[Path]) -> None:
    """Raise ``FileExistsError`` naming the first of ``paths`` that already exists."""
    for path in paths:
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; pass --overwrite to replace it (or choose another --out)"
            )


def write_trace(
    result: TraceResult, out: str | Path, *, overwrite: bool = False
) -> dict[str, Path]:
    """Write ``result``'s heatmap (PNG), view (HTML) and data (JSON) under ``out``.

    Returns the paths written, keyed by extension.  Without ``overwrite`` an
    existing file raises ``FileExistsError`` and nothing is replaced.
    """
    paths = trace_paths(out, result.kind, result.sever)
    if not overwrite:
        check_free(paths.values())
    Path(out).mkdir(parents=True, exist_ok=True)

    figure = result.plot()
    png = paths["png"]
    tmp = png.with_name(f".{png.name}.tmp")  # written whole, then renamed: no half PNGs
    figure.savefig(tmp, format="png", dpi=PNG_DPI, bbox_inches="tight")
    tmp.replace(png)

    result.show().save(paths["html"], overwrite=overwrite)
    result.save(paths["json"], overwrite=overwrite)
    return paths


def format_score(result: TraceResult, value: float) -> str:
    return f"{value:.4f}" if result.metric == "prob" else f"{value:.3f}"


def report(result: TraceResult, paths: dict[str, Path] | None = None, *, n_sites: int = 3,
           indent: str = "") -> str:
    """A few lines on a trace: answer, clean and corrupted scores, top sites, files."""
    label = "p" if result.metric == "prob" else "log p"
    title = result.kind if result.sever is None else f"{result.kind} (severed {result.sever})"
    if result.kind != "hidden":
        title += f", window {result.window}"
    start, end = result.subject_range
    lines = [
        f"{title}: {label}({result.answer!r}) clean {format_score(result, result.high_score)}, "
        f"corrupted {format_score(result, result.low_score)}, "
        f"total effect {format_score(result, result.total_effect)}",
        f"  top {n_sites} restoration sites (token, layer -> {label}):",
    ]
    for position, token, layer, score in result.top_sites(n_sites):
        where = "last subject token" if position == end - 1 else (
            "subject token" if start <= position < end else
            "last token" if position == len(result.tokens) - 1 else "token")
        lines.append(f"    {position:>3} {token!r:<14} layer {layer:>3} -> "
                     f"{format_score(result, score)}   ({where})")
    # The top sites of a hidden trace are often the last token's late layers, where
    # restoring is nearly the clean run; the subject's best site is the paper's early site.
    subject_scores = result.scores[start:end]
    best = int(subject_scores.argmax())
    position, layer = start + best // result.n_layers, best % result.n_layers
    lines.append(f"  best site at the subject: {position:>3} {result.tokens[position]!r:<14} "
                 f"layer {layer:>3} -> {format_score(result, float(subject_scores.max()))}")
    if paths:
        lines.append("  wrote " + ", ".join(str(p) for p in paths.values()))
    return "\n".join(indent + line for line in lines)


# --------------------------------------------------------------------------- parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def noise_level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-rome",
        description="Causal tracing of factual recall on TransformerLens models "
                    "(Meng et al. 2022, 'Locating and Editing Factual Associations in GPT').",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_trace(commands)
    add_trace_dataset_parser(commands)
    add_edit_parser(commands)
    add_evaluate_parser(commands)
    _add_precision(commands)
    return parser


def _add_precision(commands) -> None:
    sub = commands.add_parser(
        "precision", help="is bfloat16 fast here? the probe's answer and each command's precision",
        description="Measure once whether bfloat16 matrix products beat float32 on this "
                    "machine, and print the precision each entry point then uses.")
    sub.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    sub.set_defaults(run=_run_precision)


def _run_precision(args: argparse.Namespace) -> int:
    from lens_rome.precision import entry_points, probe_report  # noqa: PLC0415

    probe = probe_report(args.device)
    print(f"device: {args.device} ({probe.get('cpu', probe.get('device'))}"
          + (f", torch CPU capability {probe['cpu_capability']}" if "cpu_capability" in probe
             else "") + ")")
    print(f"bfloat16 is {'fast' if probe['bf16_fast'] else 'slow'} here: {probe['rule']}")
    for name, precision in entry_points(args.device).items():
        print(f"  {precision:9} {name}")
    return 0


def _add_trace(commands) -> None:
    embedded = ", ".join(sorted(EMBEDDED_MODELS))
    trace = commands.add_parser(
        "trace",
        help="causal trace of one fact: where does the model recall it?",
        description="Corrupt the subject's token embeddings with noise, then restore one "
                    "state at a time to its clean value and measure how much of the answer's "
                    "probability comes back.  Writes, per kind, trace_<kind>.png (heatmap), "
                    "trace_<kind>.html (offline interactive view) and trace_<kind>.json "
                    "(the result, reloadable with lens_rome.TraceResult.load).",
        epilog='example: lens-rome trace --prompt "The Eiffel Tower is located in the city of" '
               '--subject "The Eiffel Tower" --kind all --out eiffel',
    )
    trace.add_argument("--prompt", required=True,
                       help="the fact as a prompt the model completes, e.g. "
                            "'The Eiffel Tower is located in the city of'")
    trace.add_argument("--subject", required=True,
                       help="the subject, written exactly as in the prompt; its tokens get the "
                            "noise, e.g. 'The Eiffel Tower'")
    trace.add_argument("--kind", choices=[*KINDS, "all"], default="hidden",
                       help="state restored: hidden (residual stream after each block), mlp or "
                            "attn (outputs over a window of layers), or all three "
                            "(default: %(default)s)")
    trace.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"an embedded model that loads offline ({embedded}) or a "
                            f"TransformerLens model name, which downloads weights "
                            f"(default: %(default)s)")
    trace.add_argument("--samples", type=positive_int, default=10, metavar="N",
                       help="noise draws averaged (default: %(default)s, as in the paper)")
    trace.add_argument("--window", type=positive_int, default=10, metavar="W",
                       help="layers restored together for mlp and attn, centred on each layer "
                            "(default: %(default)s, as in the paper)")
    trace.add_argument("--noise", type=noise_level, default=None, metavar="LEVEL",
                       help="standard deviation of the Gaussian noise (default: 3 x the "
                            "standard deviation of the model's token embeddings, the paper's 's3')")
    trace.add_argument("--target", default=None,
                       help="the answer to measure, with its leading space, e.g. ' Paris' "
                            "(default: the model's most likely next token on the clean prompt)")
    trace.add_argument("--metric", choices=METRICS, default="prob",
                       help="prob: mean probability of the answer (the paper's); logprob: mean "
                            "log-probability (default: %(default)s)")
    trace.add_argument("--sever", choices=("mlp", "attn"), default=None,
                       help="with --kind hidden: freeze the restored token's MLP (or attention) "
                            "outputs at their corrupted values (the paper's Figure 3); files are "
                            "named trace_hidden_sever_<mlp|attn>.*")
    trace.add_argument("--seed", type=int, default=0, metavar="S",
                       help="seed of the noise draws (default: %(default)s)")
    trace.add_argument("--bf16", action="store_true",
                       help="run the restored passes in bfloat16 (faster on CPUs with bf16 units)")
    trace.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                       help="folder for the output files (default: %(default)s)")
    trace.add_argument("--overwrite", action="store_true",
                       help="replace output files that already exist (default: refuse and exit)")
    trace.set_defaults(run=run_trace)


# --------------------------------------------------------------------------- commands


def load(name: str):
    """``load_model(name)``, without TransformerLens' printed chatter ("Moving model to ...")."""
    from lens_rome.models import load_model  # noqa: PLC0415 (slow import, after parsing)

    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        model = load_model(name)
    if chatter.getvalue().strip():
        log.debug("load_model printed: %s", chatter.getvalue().strip())
    return model


def run_trace(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # noqa: PLC0415

    from lens_rome.tracing import trace  # noqa: PLC0415

    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    if args.sever is not None and kinds != ["hidden"]:
        raise CommandError(f"--sever applies to hidden-state traces only; use --kind hidden "
                           f"(got --kind {args.kind})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} exists and is not a folder")
    if not args.overwrite:  # before any work: never trace for minutes and then refuse
        check_free([p for kind in kinds for p in trace_paths(out, kind, args.sever).values()])

    model = load(args.model)
    print(f"model {args.model}; prompt {args.prompt!r}; subject {args.subject!r}")
    bar = tqdm(kinds, desc="kinds", unit="kind", disable=len(kinds) == 1)
    for kind in bar:
        bar.set_postfix_str(kind)
        result = trace(
            model, args.prompt, args.subject, kind, samples=args.samples, window=args.window,
            noise=args.noise, sever=args.sever, target=args.target, metric=args.metric,
            seed=args.seed, bf16=args.bf16, progress=True,
        )
        paths = write_trace(result, out, overwrite=args.overwrite)
        tqdm.write(report(result, paths))
    bar.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns 0 on success.

    Bad input exits with status 2 (``SystemExit``) after printing ``error: ...``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HookedTransformer is deprecated",
                                    category=DeprecationWarning)
            return args.run(args)
    except (CommandError, *USER_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
