"""Does localization inform editing?  Hase et al. (2023) on our models.

Causal tracing says where a fact "lives": restoring the clean MLP outputs of a
window of layers at the last subject token recovers much of the answer's
probability at some layers and little at others.  ROME edits one MLP, chosen
where the trace peaks.  Hase et al. ask whether the trace predicts where an
edit works: for each fact they trace it, edit it at every layer in turn, and
regress the edit's success on the layer and on the trace.  On GPT-J the layer
alone explains R^2 = 94.7% of the rewrite score and the trace adds 0.1 point:
the trace says almost nothing about which layer to edit, beyond the layer.

Here, for each case (a CounterFact-style case built from the known facts the
model answers correctly, exactly as ``benchmarks/rome_edits.py`` builds them):

- the MLP causal trace (``lens_rome.trace(..., "mlp")``, the true object as
  target, the answer probability as metric) gives the indirect effect
  ``IE_l = p(o | restored window at l) - p(o | corrupted)`` at the last subject
  token for every layer ``l``;
- for every edit layer ``l`` of ``--layers``, ROME at ``l`` (the paper's
  hyper-parameters otherwise), measured, then reverted: ``rome_edits.score``
  (efficacy, paraphrase, neighbourhood) and Hase et al.'s rewrite score on the
  rewrite prompt, with ``p = exp(mean token log-probability of the new object)``::

      rewrite = (p_new_post - p_new_pre) / (1 - p_new_pre)

The report takes every (case, layer) pair: per layer the mean trace effect and
mean rewrite score / efficacy; Pearson and Spearman correlation of ``IE_l`` and
the rewrite score; and the R^2 of least-squares regressions of the rewrite score
on (a) one-hot layer indicators (the per-layer means) and (b) the indicators
plus ``IE_l``.  (b) nests (a), so its R^2 is never smaller; the difference is
what tracing adds.

Every trace and every finished (case, layer) edit is one line of
``OUT/records.jsonl``, written as it finishes: rerun the same command to resume
(``OUT/run.json`` keeps the settings and a hash of each case; a rerun with other
ones is refused).  ``--report`` prints the table and draws the figure from the
stored records only.

Run (``--threads 1`` on a machine busy with other work)::

    .venv/bin/python benchmarks/localization_vs_editing.py --threads 2
    .venv/bin/python benchmarks/localization_vs_editing.py --model gemma-3-270m --threads 2
    .venv/bin/python benchmarks/localization_vs_editing.py --report

Cost, measured (2-core AMD EPYC, 1 torch thread per run, the two models' runs side
by side, 2026-12-07; docs/editing.md has the tables): SmolLM2-135M 9.5 s per edit and
12.9 s per trace, 300 edits and 30 traces in about 1 h 10 min; Gemma-3-270M 21.8 s per
edit and 10.8 s per trace, 180 edits in about 1 h 20 min.  Every edit layer also needs
ROME's key statistics, computed once in one pass for all layers and cached on disk
(808 s for SmolLM2's layers 0, 6, 9, ..., 27 at one thread; docs/editing.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KNOWN_FACTS = ROOT.parent / "shared" / "data" / "known_facts.json"
FIGURES = ROOT / "docs" / "figures"
STORE = "records.jsonl"


def _rome_edits():
    """``benchmarks/rome_edits.py`` (a script beside this one, not a package): its case
    building and scoring are reused, not copied."""
    spec = importlib.util.spec_from_file_location("rome_edits",
                                                  Path(__file__).with_name("rome_edits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rome_edits = _rome_edits()


# --- measuring ---------------------------------------------------------------------------

def p_new(model, case: dict) -> float:
    """``exp`` of the new object's mean token log-probability on the rewrite prompt."""
    from lens_rome.evaluation import target_log_probs

    request = case["request"]
    prompt = request["prompt"].replace("{}", request["subject"])
    return math.exp(float(target_log_probs(model, [prompt], [request["target_new"]])[0, 0]))


def rewrite_score(before: float, after: float) -> float:
    """Hase et al.'s rewrite score: the share of the room left to probability 1 that the
    edit took (1: the new object is certain, 0: no change, < 0: less likely)."""
    return (after - before) / (1 - before)


def trace_record(model, case: dict, samples: int, window: int) -> dict:
    """The MLP trace of a case's true fact: the indirect effect at the last subject token
    for every layer."""
    from lens_rome import trace

    request = case["request"]
    start = time.perf_counter()
    result = trace(model, request["prompt"].replace("{}", request["subject"]),
                   request["subject"], "mlp", samples=samples, window=window,
                   target=request["target_true"])
    seconds = time.perf_counter() - start
    last = result.subject_range[1] - 1
    return {"kind": "trace", "known_id": case["known_id"], "subject": request["subject"],
            "subject_range": list(result.subject_range), "high_score": result.high_score,
            "low_score": result.low_score, "seconds": seconds,
            "effect": result.indirect_effect[last].tolist()}


def edit_record(model, case: dict, hparams, stats) -> dict:
    """ROME at ``hparams.layer``, scored, then reverted."""
    from lens_rome.editing import rome

    before = p_new(model, case)
    start = time.perf_counter()
    change = rome.edit(model, case["request"], hparams=hparams, stats=stats)
    seconds = time.perf_counter() - start
    try:
        after = p_new(model, case)
        scores = rome_edits.score(model, case)
    finally:
        change.revert()
    return {"kind": "edit", "known_id": case["known_id"], "layer": hparams.layer,
            "p_new_pre": before, "p_new_post": after, "rewrite": rewrite_score(before, after),
            **scores, "v_steps": len(change.info.get("v_history", ())), "seconds": seconds}


def read_records(out: Path) -> list[dict]:
    store = Path(out) / STORE
    return [json.loads(line) for line in store.read_text().splitlines() if line.strip()] \
        if store.exists() else []


def resumed(out: Path, settings: dict, cases: list[dict]) -> list[dict]:
    """The records already in ``out``, after checking that its run had the same
    ``settings`` and cases (by content hash); records both in ``out/run.json``."""
    from lens_rome.storage import check_resumable, check_same_items, content_hash, write_json

    path = out / "run.json"
    stored = json.loads(path.read_text()) if path.exists() else None
    stored_cases = stored.pop("cases_measured", None) if stored else None
    hashes = {str(c["known_id"]): content_hash(c) for c in cases}
    fix = "choose another --out"
    if stored is not None:
        check_resumable(out, settings, stored, fix=fix)
        hashes = check_same_items(out, stored_cases, hashes, what="case", fix=fix)
    write_json(path, {**settings, "cases_measured": hashes})
    return read_records(out)


def run(model, cases: list[dict], layers: Iterable[int], out: str | Path, *,
        samples: int = 5, window: int = 10, hparams=None,
        stats: Mapping[int, Any] | None = None, settings: Mapping[str, Any] | None = None,
        progress: bool = True) -> list[dict]:
    """Trace every case and edit it at every layer of ``layers``; returns every record of
    ``out`` (those of earlier runs too).

    ``hparams``: ROME's (default ``RomeHyperParams.for_model(model)``); each edit replaces
    its layer.  ``stats``: layer -> key statistics (default: ``key_statistics_many`` with the
    hyper-parameters' sample, from the cache when there, the missing layers in one pass).  ``settings``: more settings to
    record and check on resume (such as the seed that chose the cases).
    """
    from tqdm.auto import tqdm

    from lens_rome import RomeHyperParams, adapter_for
    from lens_rome.editing import key_statistics_many
    from lens_rome.editing.prefixes import context_prefixes

    layers = sorted({adapter_for(model).check_layer(layer) for layer in layers})
    hp = hparams if hparams is not None else RomeHyperParams.for_model(model, layer=layers[0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = {k: v for k, v in hp.to_dict().items() if k != "layer"}
    everything = {"model": adapter_for(model).name, "layers": layers, "samples": samples,
                  "window": window, "hparams": recorded, **(settings or {})}
    records = resumed(out, everything, cases)
    traced = {r["known_id"] for r in records if r["kind"] == "trace"}
    edited = {(r["known_id"], r["layer"]) for r in records if r["kind"] == "edit"}
    todo = [(case, layer) for case in cases for layer in (None, *layers)
            if (case["known_id"] not in traced if layer is None
                else (case["known_id"], layer) not in edited)]
    stats = dict(stats or {})
    needed = sorted({layer for _, layer in todo if layer is not None} - set(stats))
    if needed:  # one pass over the corpus for all of them (then cached on disk), never timed
        stats.update(key_statistics_many(model, needed, samples=hp.stats_samples,
                                         token_length=hp.stats_token_length, progress=progress))
    if hp.prefixes is None and any(layer is not None for _, layer in todo):
        context_prefixes(model, hp.n_prefixes, hp.prefix_lengths, hp.seed)  # once, untimed
    threads = torch.get_num_threads()
    with (out / STORE).open("a") as store:
        for case, layer in tqdm(todo, desc="traces and edits", disable=not progress):
            if layer is None:
                record = trace_record(model, case, samples, window)
            else:
                record = edit_record(model, case, hp.replace(layer=layer), stats[layer])
            record["threads"] = threads
            store.write(json.dumps(record) + "\n")
            store.flush()
            records.append(record)
    return records


# --- the report --------------------------------------------------------------------------

def pairs(records: list[dict]) -> list[tuple[int, float, float]]:
    """``(layer, trace effect at that layer, rewrite score)`` of every edit whose case was
    traced."""
    effects = {r["known_id"]: r["effect"] for r in records if r["kind"] == "trace"}
    return [(r["layer"], effects[r["known_id"]][r["layer"]], r["rewrite"])
            for r in records if r["kind"] == "edit" and r["known_id"] in effects]


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties given their average rank (as Spearman's correlation needs)."""
    order = np.empty(len(x))
    order[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=order) / counts)[group]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denominator if denominator > 0 else math.nan


def r_squared(design: np.ndarray, y: np.ndarray) -> float:
    """R^2 of the least-squares fit of ``y`` on the columns of ``design``."""
    coefficients = np.linalg.lstsq(design, y, rcond=None)[0]
    residual = y - design @ coefficients
    total = float(((y - y.mean()) ** 2).sum())
    return 1 - float(residual @ residual) / total if total > 0 else math.nan


def report(records: list[dict]) -> dict:
    """The figures of the records: per-layer means, correlations and the two R^2."""
    found = pairs(records)
    if not found:
        raise SystemExit("error: no edit with a traced case among the records")
    layer = np.array([p[0] for p in found])
    effect = np.array([p[1] for p in found], dtype=float)
    rewrite = np.array([p[2] for p in found], dtype=float)
    layers = sorted(set(layer.tolist()))
    indicators = (layer[:, None] == np.array(layers)[None, :]).astype(float)
    edits = [r for r in records if r["kind"] == "edit"]
    traces = [r for r in records if r["kind"] == "trace"]
    per_layer = {}
    for l in layers:
        mine = [r for r in edits if r["layer"] == l]
        here = layer == l
        per_layer[l] = {"n": len(mine), "effect": float(effect[here].mean()),
                        "spearman": pearson(ranks(effect[here]), ranks(rewrite[here])),
                        **{k: float(np.mean([r[k] for r in mine])) for k in (
                            "rewrite", "efficacy", "paraphrase", "neighbourhood")}}
    clean = np.array([t["high_score"] for t in traces], dtype=float)
    return {
        "cases": len({r["known_id"] for r in edits}), "pairs": found, "layers": layers,
        "per_layer": per_layer,
        "effect_by_layer": np.mean([t["effect"] for t in traces], axis=0).tolist(),
        "clean_probability": {"min": float(clean.min()), "median": float(np.median(clean)),
                              "max": float(clean.max())},
        "pearson": pearson(effect, rewrite), "spearman": pearson(ranks(effect), ranks(rewrite)),
        "r2_layer": r_squared(indicators, rewrite),
        "r2_layer_trace": r_squared(np.column_stack([indicators, effect]), rewrite),
        "edit_seconds": float(np.mean([r["seconds"] for r in edits])),
        "trace_seconds": float(np.mean([r["seconds"] for r in traces])),
        "threads": sorted({r.get("threads") for r in records} - {None}),
    }


def markdown(summary: dict, settings: Mapping[str, Any]) -> str:
    """The report as a header line and a markdown table docs can paste verbatim."""
    gain = 100 * (summary["r2_layer_trace"] - summary["r2_layer"])
    threads = ",".join(map(str, summary["threads"])) or "?"
    lines = [
        f"{settings.get('model', '?')}: {summary['cases']} cases, edit layers "
        f"{','.join(map(str, summary['layers']))}; MLP trace with {settings.get('samples', '?')}"
        f" noise samples, window {settings.get('window', '?')}, effect at the last subject "
        f"token; CPU ({threads} torch threads) {summary['edit_seconds']:.1f} s per edit, "
        f"{summary['trace_seconds']:.1f} s per trace (key statistics excluded)",
        "",
        "| edit layer | cases | mean trace effect | mean rewrite score | Spearman in layer "
        "| efficacy | paraphrase | neighbourhood |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for layer, row in summary["per_layer"].items():
        lines.append(f"| {layer} | {row['n']} | {row['effect']:.4f} | {row['rewrite']:.3f} | "
                     f"{row['spearman']:.2f} | {100 * row['efficacy']:.1f}% | "
                     f"{100 * row['paraphrase']:.1f}% | {100 * row['neighbourhood']:.1f}% |")
    clean = summary["clean_probability"]
    lines += [
        "",
        f"The true object's probability on the clean prompt (the trace's ceiling): median "
        f"{clean['median']:.3f}, from {clean['min']:.3f} to {clean['max']:.3f}.",
        f"Over {len(summary['pairs'])} (case, layer) pairs: trace effect vs rewrite score "
        f"Pearson {summary['pearson']:.3f}, Spearman {summary['spearman']:.3f}; R^2 of the "
        f"rewrite score from the layer alone {100 * summary['r2_layer']:.1f}%, from the layer "
        f"and the trace effect {100 * summary['r2_layer_trace']:.1f}% ({gain:+.1f} points from "
        f"tracing; Hase et al., GPT-J: 94.7%, +0.1).",
    ]
    return "\n".join(lines)


def plot(summary: dict, path: str | Path, title: str = "") -> Path:
    """Per layer: mean trace effect and mean rewrite score (two axes); and the scatter of
    trace effect against rewrite score, coloured by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = summary["layers"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(range(len(summary["effect_by_layer"])), summary["effect_by_layer"], color="C0")
    left.set_xlabel("layer (MLP trace: centre of the window; ROME: edited MLP)")
    left.set_ylabel("mean trace effect (last subject token)", color="C0")
    twin = left.twinx()
    twin.plot(layers, [summary["per_layer"][l]["rewrite"] for l in layers], "o-", color="C1")
    twin.set_ylabel("mean rewrite score", color="C1")
    layer, effect, rewrite = zip(*summary["pairs"])
    dots = right.scatter(effect, rewrite, c=layer, cmap="viridis", s=14)
    fig.colorbar(dots, ax=right, label="edit layer")
    right.set_xlabel("trace effect at the edit layer")
    right.set_ylabel("rewrite score")
    right.set_title(f"Pearson {summary['pearson']:.2f}, R^2 layer {summary['r2_layer']:.3f}, "
                    f"+trace {summary['r2_layer_trace'] - summary['r2_layer']:+.3f}",
                    fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def show(out: Path, figure: Path) -> None:
    """Print the report of the records in ``out`` and draw its figure."""
    records = read_records(out)
    if not records:
        raise SystemExit(f"error: no records in {out / STORE}; run without --report first")
    settings = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    summary = report(records)
    print(markdown(summary, settings))
    title = f"{settings.get('model', '')}: {summary['cases']} cases, localization vs editing"
    print(f"wrote {plot(summary, figure, title)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m or gemma-3-270m")
    parser.add_argument("--facts", default=str(KNOWN_FACTS))
    parser.add_argument("--n", type=int, default=30, help="cases (facts answered correctly)")
    parser.add_argument("--layers", default=None,
                        help="comma-separated edit layers (default: every 3rd from 0)")
    parser.add_argument("--seed", type=int, default=0, help="picks the facts and new objects")
    parser.add_argument("--max-prompts", type=int, default=10,
                        help="at most this many paraphrase and neighbour prompts per case")
    parser.add_argument("--samples", type=int, default=5, help="noise samples of each trace")
    parser.add_argument("--window", type=int, default=10, help="MLP layers restored together")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None,
                        help="default: runs/localization_vs_editing/<model>")
    parser.add_argument("--plot", default=None,
                        help="default: docs/figures/localization_vs_editing_<model>.png")
    parser.add_argument("--report", action="store_true",
                        help="print the table and draw the figure from OUT only")
    args = parser.parse_args()
    out = Path(args.out or ROOT / "runs" / "localization_vs_editing" / args.model)
    figure = Path(args.plot or FIGURES / f"localization_vs_editing_{args.model}.png")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.report:
        from lens_rome import RomeHyperParams, load_model

        model = load_model(args.model)
        layers = [int(x) for x in args.layers.split(",") if x] if args.layers \
            else list(range(0, model.cfg.n_layers, 3))
        cases = rome_edits.build_cases(model, rome_edits.load_facts(Path(args.facts)), args.n,
                                       args.seed, args.max_prompts)
        print(f"{args.model}: {len(cases)} cases, edit layers {layers}, "
              f"{torch.get_num_threads()} torch threads; records in {out / STORE}", flush=True)
        run(model, cases, layers, out, samples=args.samples, window=args.window,
            hparams=RomeHyperParams.for_model(model), progress=True,
            settings={"seed": args.seed, "max_prompts": args.max_prompts})
    show(out, figure)


if __name__ == "__main__":
    main()
