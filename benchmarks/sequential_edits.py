"""Many edits on the embedded SmolLM2: ROME, r-ROME, MEMIT and AlphaEdit one after another.

Cases: CounterFact-format cases built from ../shared/data/known_facts.json by
:func:`lens_rome.data.build_counterfact` (seed 0, in its seeded order).
SmolLM2 answers only about a hundred of these facts correctly, and 200
sequential edits need 200 cases, so every fact with paraphrases and neighbours
is a candidate (``only_correct=False``), and a case is kept when the unedited
model prefers its true object to the new one on the rewrite prompt (mean token
log-probability, the efficacy measure), so that every edit has something to
change; the verdicts are kept in ``OUT/prefer_true.json``.

For each method, :func:`lens_rome.evaluation.evaluate` with ``sequential=True``
and ``batch_size=1`` applies the first ``--n`` cases one after another without
reverting, and after each of ``--checkpoints`` (default 1, 10, 50, 100, 200)
measures at most ``--sample`` of the cases edited so far (a seeded sample; all of
them while there are fewer): efficacy, paraphrase and neighbourhood scores, and
fluency (generation entropy of the measured cases' two generation prompts,
``--max-new-tokens`` each), next to the unedited model's measures of the same
cases (cached once in ``OUT/original``).  ``--batch N``: one batch of the first
``N`` cases with MEMIT.  Everything is written as it finishes (``OUT/<method>/``:
each edit, each checkpoint); rerun the same command to resume, or with a larger
``--n`` (and its checkpoint) to extend a finished run.  The table is printed from
every finished run in ``OUT``.

Prints a markdown table and writes ``OUT/table.json``, the plot (``--plot``,
default docs/figures/sequential_edits_smollm2-135m.png) and a copy of the table
next to it (``.json``).

Run: ``.venv/bin/python benchmarks/sequential_edits.py --out runs/sequential --threads 1``
(hours on a 2-core CPU: about 800 edits, each a v* optimisation of 20-30 s on a
busy 2-core machine; split it with ``--methods``, ``--n`` and ``--batch 0``).
``--choose`` instead prints the development sweep behind MEMIT's ``mom2_weight``
and AlphaEdit's null-space threshold, on other cases (``--dev-start`` on).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KNOWN_FACTS = ROOT.parent / "shared" / "data" / "known_facts.json"
FIGURE = ROOT / "docs" / "figures" / "sequential_edits_smollm2-135m.png"
METHODS = ("rome", "r-rome", "memit", "alphaedit")
LABELS = {"rome": "ROME", "r-rome": "r-ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit"}
CHECKPOINTS = (1, 10, 50, 100, 200)
# bfloat16 is ~300x slower than float32 on CPUs without bf16 units (this team's machine)
OPTIONS = {"bf16": False}


def load(args, n: int | None = None):
    """The model and the first ``n`` cases (all if None) the unedited model gets right."""
    from lens_rome import load_model
    from lens_rome.data import build_counterfact

    with contextlib.redirect_stdout(io.StringIO()):
        model = load_model(args.model)
    cases = build_counterfact(args.facts, None, only_correct=False, seed=args.seed,
                              generation_prompts=2)
    return model, prefer_true(model, cases, n, Path(args.out) / "prefer_true.json")


def prefer_true(model, cases, n: int | None, path: Path):
    """The first ``n`` cases whose rewrite prompt the unedited model continues with o rather
    than o*; the verdicts are kept in ``path`` so that later runs only look at new cases."""
    from lens_rome.evaluation import target_log_probs
    from lens_rome.storage import content_hash

    verdicts = json.loads(path.read_text()) if path.exists() else {}
    kept, looked = [], 0
    for case in cases:
        if n is not None and len(kept) == n:
            break
        key = f"{case.case_id}:{content_hash(case.to_dict())}"  # another dataset: new verdicts
        if key not in verdicts:
            request = case.request
            lp = target_log_probs(model, [case.rewrite_prompt],
                                  [request.target_true, request.target_new])[0]
            verdicts[key] = bool(lp[0] > lp[1])
        looked += 1
        if verdicts[key]:
            kept.append(case)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(verdicts))
    print(f"{len(kept)} of the first {looked} cases: the unedited model prefers the true "
          f"object", flush=True)
    return kept


def cell(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run(args) -> None:
    from lens_rome.evaluation import evaluate

    out = Path(args.out)
    if args.methods or args.batch:
        model, every = load(args, max(args.n, args.batch))
        cases = every[:args.n]
        marks = sorted({c for c in args.checkpoints if c <= len(cases)} | {len(cases)})
        print(f"model {args.model}, torch threads {torch.get_num_threads()}, {len(cases)} "
              f"cases (seed {args.seed}), checkpoints {marks}, at most {args.sample} cases "
              f"measured per checkpoint, {args.max_new_tokens} generated tokens x 2 prompts "
              f"per measured case", flush=True)
    options = {**OPTIONS, **({"v_lr": args.v_lr} if args.v_lr is not None else {})}
    for method in args.methods:
        start = time.perf_counter()
        evaluate(model, cases, method, out / method, sequential=True, checkpoints=marks,
                 checkpoint_sample=args.sample, max_new_tokens=args.max_new_tokens,
                 seed=args.seed, method_options=options, original_dir=out / "original",
                 progress=args.progress)
        print(f"{method}: done ({time.perf_counter() - start:.0f} s this run)", flush=True)
    if args.batch:
        start = time.perf_counter()
        evaluate(model, every[:args.batch], "memit", out / f"memit-batch{args.batch}",
                 batch_size=args.batch, max_new_tokens=args.max_new_tokens, seed=args.seed,
                 method_options=options, progress=args.progress)
        print(f"memit batch of {args.batch}: done ({time.perf_counter() - start:.0f} s this run)",
              flush=True)
    # the table: every run in OUT, whichever invocation made it, to its last checkpoint
    results = {m: finished(out / m) for m in METHODS if (out / m / "checkpoints").is_dir()}
    batches = sorted((json.loads(p.read_text()) for p in out.glob("memit-batch*/summary.json")),
                     key=lambda b: b["n_edits"])
    report(results, batches, args, out)


def finished(run_dir: Path) -> dict:
    """The summary of a sequential run, or what its finished checkpoints say of an unfinished
    one (``"finished": False``)."""
    if (run_dir / "summary.json").exists():
        return {**json.loads((run_dir / "summary.json").read_text()), "finished": True}
    points = [json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints").glob("*.json"))]
    edits = [json.loads(p.read_text()) for p in sorted((run_dir / "edits").glob("??????.json"))]
    return {"finished": False, "n_edits": len(edits),
            "update_norms": [e["update_norm"] for e in edits],
            "checkpoints": [{"n_edits": p["n_edits"], "measured": p.get("measured"),
                             "edited": p["summary"], "original": p["original"],
                             "perplexity": p.get("perplexity"),
                             "update_norm": p.get("update_norm")} for p in points],
            "original": points[-1]["original"] if points else None,
            "perplexity_unedited": _unedited_perplexity(run_dir)}


def _unedited_perplexity(run_dir: Path) -> float | None:
    path = run_dir / "perplexity.json"
    return json.loads(path.read_text())["unedited"] if path.exists() else None


def report(results: dict, batches: list[dict], args, out: Path) -> None:
    rows = []
    print("\n| method | edits | cases measured | S | ES | PS | NS | fluency | unedited fluency "
          "| fluency change | mean update norm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    protocols = []  # the second table: both protocols, CounterFact+ and perplexity
    for method, summary in results.items():
        norms = summary["update_norms"]
        for point in summary["checkpoints"]:
            e, o, n = point["edited"], point["original"], point["n_edits"]
            change = None if e["fluency"] is None or not o["fluency"] else \
                100 * (e["fluency"] - o["fluency"]) / o["fluency"]
            norm = sum(norms[:n]) / n
            rows.append({"method": method, "n_edits": n, "measured": point.get("measured"),
                         **{k: e[k] for k in (
                "score", "efficacy_score", "paraphrase_score", "neighborhood_score",
                "fluency")}, "unedited_fluency": o["fluency"], "fluency_change": change,
                "unedited_score": o["score"], "unedited_neighborhood": o["neighborhood_score"],
                "mean_update_norm": norm,
                **{k: e.get(k) for k in ("generated_efficacy", "generated_paraphrase",
                                         "generated_neighborhood", "neighborhood_plus_score")},
                "perplexity": point.get("perplexity"),
                "unedited_perplexity": summary.get("perplexity_unedited"),
                "whole_update_norm": point.get("update_norm")})
            protocols.append(
                f"| {LABELS.get(method, method)} | {n} | {cell(e['efficacy_score'])} | "
                f"{cell(e.get('generated_efficacy'))} | {cell(e['paraphrase_score'])} | "
                f"{cell(e.get('generated_paraphrase'))} | {cell(e['neighborhood_score'])} | "
                f"{cell(e.get('generated_neighborhood'))} | "
                f"{cell(e.get('neighborhood_plus_score'))} | "
                f"{cell(o.get('generated_neighborhood'))} | {cell(o.get('neighborhood_plus_score'))}"
                f" | {cell(point.get('perplexity'), 2)} "
                f"| {cell(summary.get('perplexity_unedited'), 2)} | "
                f"{cell(point.get('update_norm'), 2)} |")
            print(f"| {LABELS.get(method, method)} | {n} | {point.get('measured', n)} | "
                  f"{cell(e['score'])} | "
                  f"{cell(e['efficacy_score'])} | {cell(e['paraphrase_score'])} | "
                  f"{cell(e['neighborhood_score'])} | {cell(e['fluency'])} | "
                  f"{cell(o['fluency'])} | {cell(change)}% | {norm:.2f} |")
    for method, summary in results.items():
        if not summary["finished"]:
            print(f"({LABELS.get(method, method)}: unfinished, {summary['n_edits']} edits made)")
    originals = [s["original"] for s in results.values() if s["finished"]]
    if originals:
        o = originals[0]
        print(f"| unedited | 0 | {o['n']} | {cell(o['score'])} | {cell(o['efficacy_score'])} | "
              f"{cell(o['paraphrase_score'])} | {cell(o['neighborhood_score'])} | "
              f"{cell(o['fluency'])} | | | |")
    print("\n| method | edits | ES tf | ES gen | PS tf | PS gen | NS tf | NS gen | NS+ "
          "| unedited NS gen | unedited NS+ | perplexity | unedited perplexity "
          "| norm of the whole change |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(protocols))
    for method, summary in results.items():
        after = summary.get("right_after")
        if after:
            print(f"{LABELS.get(method, method)}, each case right after its own edit: ES "
                  f"{cell(after['efficacy_score'])} tf / {cell(after.get('generated_efficacy'))}"
                  f" gen, PS {cell(after['paraphrase_score'])} / "
                  f"{cell(after.get('generated_paraphrase'))}, NS "
                  f"{cell(after['neighborhood_score'])} / "
                  f"{cell(after.get('generated_neighborhood'))}")
    for batch in batches:
        print(f"\nMEMIT, one batch of {batch['n_edits']} edits: S {cell(batch['score'])}, "
              f"ES {cell(batch['efficacy_score'])}, PS {cell(batch['paraphrase_score'])}, "
              f"NS {cell(batch['neighborhood_score'])}, fluency {cell(batch['fluency'])}, "
              f"update norm {batch['update_norms'][0]:.2f}")
    last = [max((r for r in rows if r["method"] == m), key=lambda r: r["n_edits"])
            for m in results]
    for r in last:
        good = (r["score"] or 0) >= 80 and r["fluency_change"] is not None and \
            abs(r["fluency_change"]) <= 5
        print(f"after {r['n_edits']} edits, {LABELS.get(r['method'], r['method'])}: score "
              f"{cell(r['score'])} (goal >= 80), fluency change {cell(r['fluency_change'])}% "
              f"(goal within 5%): {'met' if good else 'not met'}")
    table = json.dumps({"rows": rows, "batches": batches}, indent=1)
    (out / "table.json").write_text(table)
    if rows and args.plot:
        plot(rows, Path(args.plot), args)
        Path(args.plot).with_suffix(".json").write_text(table)  # the numbers behind the plot


# the plot's panels: (title, [(row key, line style, protocol label)]); teacher-forced solid,
# generated dashed, CounterFact+ dotted
PANELS = (
    ("score S (teacher-forced)", [("score", "-", "")]),
    ("efficacy ES", [("efficacy_score", "-", "tf"), ("generated_efficacy", "--", "gen")]),
    ("paraphrase PS", [("paraphrase_score", "-", "tf"), ("generated_paraphrase", "--", "gen")]),
    ("neighbourhood NS", [("neighborhood_score", "-", "tf"),
                          ("generated_neighborhood", "--", "gen"),
                          ("neighborhood_plus_score", ":", "NS+")]),
    ("fluency (generation entropy x 100)", [("fluency", "-", "")]),
    ("perplexity, held-out text", [("perplexity", "-", "")]),
    ("norm of the whole change", [("whole_update_norm", "-", "")]),
)
# the unedited model's value drawn beside a panel's first key
UNEDITED = {"score": "unedited_score", "neighborhood_score": "unedited_neighborhood",
            "fluency": "unedited_fluency", "perplexity": "unedited_perplexity"}


def plot(rows: list[dict], path: Path, args) -> None:
    """One panel per measure against the number of edits (log scale), one colour per method;
    both protocols in the same panel (teacher-forced solid, generated dashed, NS+ dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [line for line in lines if any(r.get(line[0]) is not None for r in rows)])
              for title, lines in PANELS]
    panels = [(title, lines) for title, lines in panels if lines]
    columns = min(4, len(panels))
    grid = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(grid, columns, figsize=(4 * columns, 3.3 * grid), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    marks = sorted({r["n_edits"] for r in rows})
    for ax, (title, lines) in zip(axes.flat, panels):
        for colour, method in enumerate(methods):
            mine = [r for r in rows if r["method"] == method]
            for key, style, protocol in lines:
                label = " ".join(filter(None, [LABELS.get(method, method), protocol]))
                ax.plot([r["n_edits"] for r in mine], [r.get(key) for r in mine], style,
                        marker="o", markersize=3, color=f"C{colour}", label=label)
        first = lines[0][0]
        if first in UNEDITED:
            mine = [r for r in rows if r["method"] == methods[0]]
            ax.plot([r["n_edits"] for r in mine], [r.get(UNEDITED[first]) for r in mine],
                    "k--", linewidth=1, label="unedited")
        ax.set_xscale("log")
        ax.set_xticks(marks, [str(m) for m in marks])
        ax.minorticks_off()
        ax.set_xlabel("sequential edits")
        ax.set_title(title, fontsize=10)
        if len(lines) > 1 or first in UNEDITED:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{args.model}: sequential edits; measured at each checkpoint on at most "
                 f"{args.sample} of the cases edited so far (tf teacher-forced, gen generated)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def dev_targets(model, dev, hp, path: Path):
    """MEMIT's targets for the development cases, computed once and kept in ``path``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lens_rome.editing import memit

    ids = json.dumps([c.case_id for c in dev] + [hp.value.to_dict()], sort_keys=True)
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("cases") == ids:
                print(f"targets for {len(dev)} requests read from {path}", flush=True)
                return memit.TargetDeltas(f.get_tensor("deltas"), hp.layers[-1], [])
    start = time.perf_counter()
    deltas = memit.target_deltas(model, [c.request for c in dev], hp)
    print(f"targets at layer {hp.layers[-1]} for {len(dev)} requests: "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"deltas": deltas.deltas.contiguous()}, str(path), metadata={"cases": ids})
    return deltas


def choose(args) -> None:
    """Batch edits of the development cases under several mom2 weights and null-space cuts."""
    from lens_rome.editing import MemitHyperParams, key_statistics_many, memit
    from lens_rome.evaluation import measure_cases, summarize

    model, cases = load(args, args.dev_start + args.dev_n)
    dev = cases[args.dev_start:args.dev_start + args.dev_n]
    print(f"{len(dev)} development cases (positions {args.dev_start}.."
          f"{args.dev_start + len(dev) - 1} of the seeded list; the benchmark uses the first "
          f"{args.n})", flush=True)
    hp = MemitHyperParams.for_model(model, **OPTIONS)
    stats = key_statistics_many(model, hp.layers, progress=False)
    requests = [c.request for c in dev]
    deltas = dev_targets(model, dev, hp, Path(args.out) / "dev_targets.safetensors")

    def score(label, **changes):
        with memit.edited(model, requests, hparams=hp.replace(**changes), stats=stats,
                          deltas=deltas) as change:
            s = summarize(measure_cases(model, dev, max_new_tokens=0))
            norm = change.update_norm()
        print(f"| {label} | {cell(s['score'])} | {cell(s['efficacy_score'])} | "
              f"{cell(s['paraphrase_score'])} | {cell(s['neighborhood_score'])} | "
              f"{norm:.2f} |", flush=True)

    base = summarize(measure_cases(model, dev, max_new_tokens=0))
    print("\n| edit (layers %s) | S | ES | PS | NS | update norm |" % list(hp.layers))
    print("|---|---|---|---|---|---|")
    print(f"| unedited | {cell(base['score'])} | {cell(base['efficacy_score'])} | "
          f"{cell(base['paraphrase_score'])} | {cell(base['neighborhood_score'])} | 0 |")
    for weight in args.mom2_weights:
        score(f"MEMIT, mom2_weight {weight:g}", mom2_weight=weight)
    for threshold in args.thresholds:
        for l2 in args.l2s:
            score(f"AlphaEdit, threshold {threshold:g}, l2 {l2:g}", null_space=True,
                  null_space_threshold=threshold, null_space_l2=l2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", default=str(KNOWN_FACTS))
    parser.add_argument("--out", default="runs/sequential", help="output folder")
    parser.add_argument("--n", type=int, default=200, help="sequential edits per method")
    parser.add_argument("--checkpoints", type=lambda t: [int(x) for x in t.split(",")],
                        default=list(CHECKPOINTS), help="default: 1,10,50,100,200")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                        help="sequential runs (none: only the batch and the table)")
    parser.add_argument("--batch", type=int, default=100,
                        help="one MEMIT batch of this many edits (0: none)")
    parser.add_argument("--sample", type=int, default=20,
                        help="cases measured per checkpoint: a seeded sample of those edited "
                             "so far (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=40,
                        help="tokens generated per generation prompt (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="case order, targets, sampling")
    parser.add_argument("--v-lr", type=float, default=None,
                        help="the v* learning rate of every method (default: the model's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--plot", default=str(FIGURE), help="the figure ('' for none)")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--choose", action="store_true",
                        help="the development sweep of mom2_weight and the null-space cut")
    parser.add_argument("--dev-start", type=int, default=250)
    parser.add_argument("--dev-n", type=int, default=30)
    parser.add_argument("--mom2-weights", type=float, nargs="+",
                        default=[100.0, 300.0, 1000.0, 3000.0, 15000.0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--l2s", type=float, nargs="+", default=[1.0, 10.0])
    args = parser.parse_args()
    if not Path(args.facts).exists():
        sys.exit(f"error: {args.facts} is absent (is the shared data folder beside the project?)")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    choose(args) if args.choose else run(args)


if __name__ == "__main__":
    main()
