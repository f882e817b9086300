"""Writing a trace's files and reporting it on the terminal."""

from __future__ import annotations

from pathlib import Path

import torch

from lens_rome.cli.paths import check_free, trace_paths
from lens_rome.tracing.kinds import HEAD
from lens_rome.tracing.result import TraceResult

PNG_DPI = 150


def write_trace(
    result: TraceResult, out: str | Path, *, overwrite: bool = False
) -> dict[str, Path]:
    """Write ``result``'s heatmap (PNG), view (HTML) and data (JSON) under ``out``.

    Returns the paths written, keyed by extension.  Without ``overwrite`` an
    existing file raises ``FileExistsError`` and nothing is replaced.
    """
    paths = trace_paths(out, result.kind, result.sever, result.method)
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


def format_score(result, value: float) -> str:
    return f"{value:.4f}" if result.metric == "prob" else f"{value:.3f}"


def _where(result: TraceResult, position: int) -> str:
    start, end = result.subject_range
    return ("last subject token" if position == end - 1 else
            "subject token" if start <= position < end else
            "last token" if position == len(result.tokens) - 1 else "token")


def _site(layer: int, head: int | None) -> str:
    return f"layer {layer:>3}" if head is None else f"layer {layer:>3} head {head:>2}"


def report(result: TraceResult, paths: dict[str, Path] | None = None, *, n_sites: int = 3,
           indent: str = "") -> str:
    """A few lines on a trace: answer, clean and corrupted scores, top sites, files."""
    label = {"prob": "p", "logprob": "log p", "logit_diff": "logit diff"}[result.metric]
    title = result.kind if result.sever is None else f"{result.kind} (severed {result.sever})"
    if result.kind in ("mlp", "attn"):
        title += f", window {result.window}"
    if result.method == "attribution":
        fixes = [name for name in ("qk_fix", "grad_drop") if result.meta.get(name)]
        title += f" [attribution estimate{', ' + ', '.join(fixes) if fixes else ''}]"
    elif result.method == "hybrid":
        exact = int(result.exact_cells[result.subject_range[0]:].sum())
        best = result.meta["verify_best"]
        best = f"{best:.0%} of cells" if isinstance(best, float) else f"{best} cells"
        title += (f" [hybrid: {exact} cells restored exactly (the estimate's best {best}, "
                  f"{result.meta['verify']} per token), the rest estimated]")
    start, end = result.subject_range
    heads = result.kind == HEAD
    lines = [
        f"{title}: {label}({result.answer!r}) clean {format_score(result, result.high_score)}, "
        f"corrupted {format_score(result, result.low_score)}, "
        f"total effect {format_score(result, result.total_effect)}",
        f"  top {n_sites} restoration sites (token, {'layer, head' if heads else 'layer'} "
        f"-> {label}):",
    ]
    for position, token, layer, *rest in result.top_sites(n_sites):
        head, score = (rest[0], rest[1]) if heads else (None, rest[0])
        lines.append(f"    {position:>3} {token!r:<14} {_site(layer, head)} -> "
                     f"{format_score(result, score)}   ({_where(result, position)})")
    # The top sites of a hidden trace are often the last token's late layers, where
    # restoring is nearly the clean run; the subject's best site is the paper's early site.
    subject_scores = result.scores[start:end]
    best = [int(i) for i in torch.unravel_index(subject_scores.argmax(), subject_scores.shape)]
    position, layer, head = start + best[0], best[1], (best[2] if heads else None)
    lines.append(f"  best site at the subject: {position:>3} {result.tokens[position]!r:<14} "
                 f"{_site(layer, head)} -> "
                 f"{format_score(result, float(subject_scores.max()))}")
    if paths:
        lines.append("  wrote " + ", ".join(str(p) for p in paths.values()))
    return "\n".join(indent + line for line in lines)


def report_verification(checked, path: Path | None = None, indent: str = "") -> str:
    """The exact restorations of an estimate's top sites next to the estimates."""
    heads = checked.kind == HEAD
    lines = [f"  exact restoration of the estimate's top {len(checked.sites)} sites "
             f"(indirect effect, {checked.metric}):",
             f"    rank {'site':<{34 if heads else 26}} estimated      exact"]
    for rank, (site, estimated, exact) in enumerate(
            zip(checked.sites, checked.estimated, checked.exact), start=1):
        where = f"{site[0]:>3} {checked.tokens[site[0]]!r:<10} " + _site(
            site[1], site[2] if heads else None)
        lines.append(f"    {rank:>4} {where:<{34 if heads else 26}} {estimated:>+9.4f} "
                     f"{exact:>+10.4f}")
    lines.append(f"  Spearman over these sites {checked.spearman:.3f}; sign agreement "
                 f"{checked.sign_agreement:.2f}")
    if path is not None:
        lines.append(f"  wrote {path}")
    return "\n".join(indent + line for line in lines)
