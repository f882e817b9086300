"""How good, and how fast, are attribution estimates and hybrid traces against the exact trace?

For each fact the embedded SmolLM2 answers correctly (known facts, the paper's
filter), in order, this runs with the same noise draws and the same metric (the
answer's log-probability):

- the exact trace (``trace_many``, every kind of ``--kinds`` with the same noise);
- the attribution estimate at every number of integrated-gradient points of
  ``--steps`` (``attribute_many(..., steps=N)``; N=1 is attribution patching,
  the gradient at the corrupted run);
- the hybrid trace (``trace_many(..., method="hybrid", verify=k,
  verify_best=m, steps=--hybrid-steps)``) for every ``k+m`` of ``--verify``
  (none by default: see ``--second-pass``);

and compares each with the exact trace per kind:

- Spearman correlation of estimated and exact indirect effects over every
  (token, layer) cell from the first subject token on (cells before the subject
  are 0 in both and left out);
- recall: the fraction of the exact top-10 sites (highest scores) found among
  the estimate's top-20;
- seconds per fact of each (all kinds together, as each computes them together)
  and the speed-up over the exact trace of the same kinds.

Every record keeps the grids it measured (indirect effects from the first subject
token on, exact and every estimate), so other recall definitions, and the hybrid
for other k and N, can be computed later without rerunning: the report does so
for ``--report-verify`` (a hybrid's grid follows from the estimate's and the
exact one; the tests check the library's hybrid against exactly that merge).

Two corruptions: Gaussian noise at 3x the std of the facts' subject-token
embeddings (the paper's), and symmetric token replacement (``SubjectSwap``: up
to ``--samples`` other subjects of the file with the same number of tokens and
another answer, one per sample; Zhang & Nanda 2023) on ``--swap-kinds``.

Each fact's figures are appended to ``OUT/facts.jsonl`` as soon as they are
measured; rerunning resumes (``OUT/run.json`` records the settings and a hash
of the facts file and of each fact: a rerun with other ones is refused).  The
table is printed at the end (``--report`` prints it from the file without
computing).

``--second-pass`` then runs, for every fact measured, the library's hybrid trace
with its defaults (timed; compared with the stored exact grids), the plain
estimate again (a timing control against the first pass) and the noise floor (an
exact trace with other noise draws against the stored one), into
``OUT/second.jsonl``; ``--report`` prints both.

    .venv/bin/python benchmarks/attribution_quality.py --n 30 --threads 2 --samples 3
    .venv/bin/python benchmarks/attribution_quality.py --second-pass --threads 2
    .venv/bin/python benchmarks/attribution_quality.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FACTS = ROOT.parent / "shared" / "data" / "known_facts.json"
TOP, WITHIN = 10, 20


def top_cells(grid: torch.Tensor, n: int) -> set[int]:
    """The flat indices of the ``n`` highest cells (ties broken by position)."""
    return set(grid.flatten().argsort(descending=True, stable=True)[:n].tolist())


def compare(exact: torch.Tensor, estimate: torch.Tensor) -> dict:
    """Spearman, recall@TOP/WITHIN and sign agreement of two indirect-effect grids
    ``[tokens from the subject on, layers]``."""
    from lens_rome.tracing import spearman

    a, b = estimate.flatten(), exact.flatten()
    found = top_cells(exact, TOP) & top_cells(estimate, WITHIN)
    return {"spearman": spearman(a, b), "recall": len(found) / TOP,
            "sign": float(((a > 0) == (b > 0)).float().mean())}


def effects(result) -> torch.Tensor:
    """A result's indirect effects from the first subject token on: ``[tokens, layers]``."""
    return (result.scores - result.low_score)[result.subject_range[0]:].float()


def hybrid_grid(exact: torch.Tensor, estimate: torch.Tensor, k: int, best: int | float
                ) -> torch.Tensor:
    """What ``trace(method="hybrid", verify=k, verify_best=best)`` returns, from the two
    grids: exact at the estimate's ``k`` best cells of each token and ``best`` best cells
    of the grid, the estimate elsewhere."""
    if isinstance(best, float):  # a share of the cells, as the library reads it
        best = math.ceil(best * estimate.numel())
    chosen = torch.zeros(estimate.shape, dtype=torch.bool)
    chosen.scatter_(1, estimate.topk(min(k, estimate.shape[1]), dim=1).indices, True)
    chosen.view(-1)[estimate.flatten().topk(min(best, estimate.numel())).indices] = True
    return torch.where(chosen, exact, estimate)


def rounded(grid: torch.Tensor) -> list:
    return [[float(f"{x:.5g}") for x in row] for row in grid.tolist()]


def swap_alternatives(model, fact, facts, limit=10) -> list[str]:
    """Other subjects of the file with as many tokens as this fact's subject (as it sits in
    the prompt) and another answer, taken in file order after this fact."""
    from lens_rome import adapter_for, locate_subject

    adapter = adapter_for(model)
    _, (start, end) = locate_subject(model, fact["prompt"], fact["subject"])
    index = next(i for i, f in enumerate(facts) if f["known_id"] == fact["known_id"])
    chosen = []
    for other in facts[index + 1:] + facts[:index]:
        subject = other["subject"]
        if other["attribute"] == fact["attribute"] or subject in (*chosen, fact["subject"]):
            continue
        n = adapter.tokenize(subject)[0].shape[1] - int(adapter.prepend_bos)
        if n == end - start:
            chosen.append(subject)
        if len(chosen) == limit:
            break
    return chosen


def measure(model, fact, noise, samples, window, kinds, steps, verify, hybrid_steps) -> dict:
    """Exact traces, estimates and hybrids of one fact with one corruption: its figures
    and grids."""
    from lens_rome.tracing import attribute_many, trace_many

    seed = int(fact["known_id"])
    common = dict(samples=samples, seed=seed, metric="logprob", noise=noise, window=window)
    prompt, subject = fact["prompt"], fact["subject"]
    start = time.perf_counter()
    exact = trace_many(model, prompt, subject, [(k, None, None) for k in kinds], **common)
    row = {"exact_seconds": time.perf_counter() - start, "clean": exact[0].high_score,
           "corrupted": exact[0].low_score, "answer": exact[0].answer,
           "subject_range": list(exact[0].subject_range), "grids": {}}
    target = exact[0].answer_token
    for kind, result in zip(kinds, exact):
        row["grids"][f"{kind}/exact"] = rounded(effects(result))
    for n in steps:
        start = time.perf_counter()
        estimates = attribute_many(model, prompt, subject, kinds, target=target, steps=n,
                                   **common)
        row[f"steps{n}_seconds"] = time.perf_counter() - start
        assert abs(estimates[0].low_score - exact[0].low_score) < 1e-3, "not the same noise"
        for kind, result, estimate in zip(kinds, exact, estimates):
            row[f"{kind}/steps{n}"] = compare(effects(result), effects(estimate))
            row["grids"][f"{kind}/steps{n}"] = rounded(effects(estimate))
    for k, best in verify:
        start = time.perf_counter()
        hybrids = trace_many(model, prompt, subject, [(kind, None, None) for kind in kinds],
                             method="hybrid", verify=k, verify_best=best, steps=hybrid_steps,
                             **common)
        name = f"hybrid{k}+{best}@{hybrid_steps}"
        row[f"{name}_seconds"] = time.perf_counter() - start
        for kind, result, hybrid in zip(kinds, exact, hybrids):
            row[f"{kind}/{name}"] = compare(effects(result), effects(hybrid))
    return row


def resumed(out: Path, settings: dict, facts: dict[str, str]) -> set:
    """The known ids already measured in ``out``, after checking that the run there had the
    same ``settings`` and facts (``known id -> content hash``); records both in
    ``out/run.json`` (the figures of another run must not mix into this one)."""
    from lens_rome.storage import check_resumable, check_same_items, write_json

    store, path = out / "facts.jsonl", out / "run.json"
    records = [json.loads(line) for line in store.read_text().splitlines()] \
        if store.exists() else []
    stored = json.loads(path.read_text()) if path.exists() else None
    if stored is None and records:  # older versions kept some settings in each record only
        stored = dict(records[0].get("settings", {}))
    stored_facts = stored.pop("facts_measured", None) if stored else None
    fix = "choose another --out"
    if stored is not None:
        check_resumable(out, settings, stored, fix=fix, unrecorded=["model", "swap", "heads",
                                                                    "facts"])
        facts = check_same_items(out, stored_facts, facts, what="fact", fix=fix)
    write_json(path, {**settings, "facts_measured": facts})
    return {r["known_id"] for r in records}


def run(args) -> None:
    from lens_rome import load_model
    from lens_rome.data import answered_correctly, load_known_facts
    from lens_rome.storage import content_hash
    from lens_rome.tracing import Gaussian, SubjectSwap, embedding_std

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "facts.jsonl"
    model = load_model("smollm2-135m")
    facts = load_known_facts(args.facts)
    kept = []  # the first n facts answered correctly, filtered a chunk at a time
    for first in range(0, len(facts), 64):
        kept += answered_correctly(model, facts[first:first + 64])
        if len(kept) >= args.n:
            break
    kept = kept[: args.n]
    began = time.perf_counter()
    steps = ints(args.steps)
    verify = [verify_pair(pair) for pair in args.verify.split(",") if pair]
    settings = {"samples": args.samples, "window": args.window, "swap_kinds": args.swap_kinds,
                "threads": torch.get_num_threads(), "kinds": args.kinds, "steps": steps,
                "verify": verify, "hybrid_steps": args.hybrid_steps}
    done = resumed(out, {**settings, "model": "smollm2-135m", "swap": not args.no_swap,
                         "facts": content_hash(facts)},
                   {str(f["known_id"]): content_hash(f) for f in kept})
    level = 3.0 * embedding_std(model, [f["subject"] for f in facts])
    print(f"machine: {platform.machine()} ({platform.processor() or 'cpu'}), "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; {len(kept)} "
          f"facts; noise level {level:.4f}; {len(done)} already measured in {store}",
          flush=True)
    kinds = tuple(args.kinds.split(","))
    for number, fact in pending(kept, done, args.minutes, began):
        record = {"known_id": fact["known_id"], "subject": fact["subject"],
                  "prompt": fact["prompt"], "settings": settings}
        record["gaussian"] = measure(model, fact, Gaussian(level=level), args.samples,
                                     args.window, kinds, steps, verify, args.hybrid_steps)
        if not args.no_swap:
            alternatives = swap_alternatives(model, fact, facts, limit=args.samples)
            record["swap_alternatives"] = alternatives
            if alternatives:
                record["swap"] = measure(model, fact, SubjectSwap(alternatives),
                                         len(alternatives), args.window,
                                         tuple(args.swap_kinds.split(",")), steps, verify,
                                         args.hybrid_steps)
        with store.open("a") as f:
            f.write(json.dumps(record) + "\n")
        g = record["gaussian"]
        print(f"[{number + 1}/{len(kept)}] {fact['subject']!r}: exact {g['exact_seconds']:.1f} s; "
              + "; ".join(f"steps={n} {g[f'steps{n}_seconds']:.2f} s recall "
                          + " ".join(f"{kind} {g[f'{kind}/steps{n}']['recall']:.1f}"
                                     for kind in kinds) for n in steps), flush=True)
    report(store, args)


def pending(items: list[dict], done: set, minutes: float | None, began: float):
    """``(number, item)`` for the items whose ``known_id`` is not in ``done``, until
    ``minutes`` have passed since ``began`` (then it says how to resume)."""
    for number, item in enumerate(items):
        if item["known_id"] in done:
            continue
        if minutes and time.perf_counter() - began > 60 * minutes:
            print(f"stopping after {minutes} minutes; rerun to resume", flush=True)
            return
        yield number, item


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def verify_pair(text: str) -> tuple[int, int | float]:
    """``"k+best"``: cells per token and best cells of the grid (a count, or a share)."""
    k, best = text.split("+")
    return int(k), float(best) if "." in best else int(best)


def offline_hybrids(row: dict, kinds, ks) -> None:
    """Adds ``{kind}/merged{k}+{best}@{n}`` figures computed from the stored grids."""
    start_steps = [key.split("/")[1] for key in row["grids"] if key.startswith(kinds[0] + "/steps")]
    for kind in kinds:
        exact = torch.tensor(row["grids"][f"{kind}/exact"])
        for method in start_steps:
            estimate = torch.tensor(row["grids"][f"{kind}/{method}"])
            for k, best in ks:
                merged = hybrid_grid(exact, estimate, k, best)
                row[f"{kind}/merged{k}+{best}@{method[5:]}"] = compare(exact, merged)


def report(store: Path, args) -> None:
    records = [json.loads(line) for line in store.read_text().splitlines()]
    kept = [r["known_id"] for r in records]
    settings = records[0]["settings"]
    if any(r["settings"] != settings for r in records):
        print("warning: the records were measured with different settings", flush=True)
    ks = [verify_pair(pair) for pair in args.report_verify.split(",")]
    print(f"\n{len(records)} facts (known_id {min(kept)}..{max(kept)}), samples "
          f"{settings['samples']} (swap: one per other subject, as many), window "
          f"{settings['window']} for mlp and attn, {settings['threads']} torch threads; "
          f"metric: log-probability of the answer; Spearman over cells from the first subject "
          f"token; recall = exact top-{TOP} within estimate top-{WITHIN}; s per fact: the kinds "
          f"of one noise rule together; speed-up: exact seconds / method seconds.  steps=N: "
          f"attribution with N integrated-gradient points (1: attribution patching); "
          f"hybrid k+m @ N: trace(method='hybrid', verify=k, verify_best=m, steps=N), run; "
          f"merged k+m @ N: the same grid computed here from the stored exact and estimated "
          f"grids (m < 1: a share of the cells; no timing)")
    for noise in ("gaussian", "swap"):
        rows = [r[noise] for r in records if noise in r]
        if not rows:
            continue
        kinds = [key.split("/")[0] for key in rows[0]["grids"] if key.endswith("/exact")]
        for row in rows:
            offline_hybrids(row, kinds, ks)
        exact = statistics.mean(r["exact_seconds"] for r in rows)
        te = statistics.mean(r["clean"] - r["corrupted"] for r in rows)
        print(f"\n{noise}: {len(rows)} facts; mean total effect (log p) {te:.2f}; exact trace "
              f"({'+'.join(kinds)}) {exact:.1f} s per fact")
        print(f"| kind | method | Spearman mean | Spearman median | recall@{TOP}/{WITHIN} mean "
              f"| facts with recall >= 0.8 | sign agreement | s per fact | speed-up |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        methods = [key.split("/", 1)[1] for key in rows[0] if key.startswith(kinds[0] + "/")]
        for kind in kinds:
            for method in methods:
                key = f"{kind}/{method}"
                rho = [r[key]["spearman"] for r in rows]
                recall = [r[key]["recall"] for r in rows]
                sign = [r[key]["sign"] for r in rows]
                good = sum(x >= 0.8 for x in recall)
                if method.startswith("merged"):
                    timing = "- | -"
                    label = method.replace("merged", "merged ").replace("@", " @ ")
                else:
                    seconds = statistics.mean(r[f"{method}_seconds"] for r in rows)
                    timing = f"{seconds:.2f} | {exact / seconds:.1f}x"
                    label = method.replace("steps", "steps=").replace("hybrid", "hybrid ").replace(
                        "@", " @ ")
                print(f"| {kind} | {label} | {statistics.mean(rho):.3f} | "
                      f"{statistics.median(rho):.3f} | {statistics.mean(recall):.3f} | "
                      f"{good}/{len(rows)} | {statistics.mean(sign):.3f} | {timing} |")
    second = store.parent / "second.jsonl"
    if second.exists():
        report_second(second, records)


def second_pass(args) -> None:
    """For every fact of ``OUT/facts.jsonl``: the hybrid trace with the library's defaults
    (timed, compared with the stored exact grids), the plain estimate again (a timing
    control: the first pass measured it beside the exact trace), and the noise floor: an
    exact trace of the Gaussian kinds with other noise draws (seed + 1) compared with the
    stored one.  Appends to ``OUT/second.jsonl``; resumes."""
    from lens_rome import load_model
    from lens_rome.data import load_known_facts
    from lens_rome.tracing import Gaussian, SubjectSwap, attribute_many, embedding_std, trace_many

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    records = [json.loads(line) for line in (out / "facts.jsonl").read_text().splitlines()]
    path = out / "second.jsonl"
    done = {json.loads(line)["known_id"] for line in path.read_text().splitlines()} \
        if path.exists() else set()
    model = load_model("smollm2-135m")
    facts = load_known_facts(args.facts)
    level = 3.0 * embedding_std(model, [f["subject"] for f in facts])
    began = time.perf_counter()
    print(f"second pass: {torch.get_num_threads()} torch threads; {len(done)} of "
          f"{len(records)} facts already in {path}", flush=True)
    for number, record in pending(records, done, args.minutes, began):
        settings, seed = record["settings"], int(record["known_id"])
        prompt, subject = record["prompt"], record["subject"]
        row = {"known_id": record["known_id"]}
        for noise_name, noise, samples in (
                ("gaussian", Gaussian(level=level), settings["samples"]),
                ("swap", SubjectSwap(record.get("swap_alternatives") or ["-"]),
                 len(record.get("swap_alternatives") or []))):
            if noise_name not in record:
                continue
            first = record[noise_name]
            kinds = [key.split("/")[0] for key in first["grids"] if key.endswith("/exact")]
            common = dict(samples=samples, window=settings["window"], metric="logprob",
                          noise=noise)
            figures = {}
            start = time.perf_counter()
            hybrids = trace_many(model, prompt, subject, [(k, None, None) for k in kinds],
                                 method="hybrid", seed=seed, **common)
            figures["hybrid_seconds"] = time.perf_counter() - start
            figures["hybrid_exact_cells"] = sum(
                int(h.exact_cells[h.subject_range[0]:].sum()) for h in hybrids)
            figures["cells"] = sum(h.exact_cells[h.subject_range[0]:].numel() for h in hybrids)
            figures["hybrid_meta"] = {key: hybrids[0].meta[key]
                                      for key in ("verify", "verify_best", "steps")}
            start = time.perf_counter()
            attribute_many(model, prompt, subject, kinds, steps=1, seed=seed,
                           target=hybrids[0].answer_token, **common)
            figures["steps1_seconds"] = time.perf_counter() - start
            for kind, hybrid in zip(kinds, hybrids):
                exact = torch.tensor(first["grids"][f"{kind}/exact"])
                figures[f"{kind}/hybrid"] = compare(exact, effects(hybrid))
            if noise_name == "gaussian":
                floor_kinds = [k for k in kinds if k in ("hidden", "mlp")]
                other = trace_many(model, prompt, subject, [(k, None, None) for k in floor_kinds],
                                   seed=seed + 1, **common)
                for kind, result in zip(floor_kinds, other):
                    exact = torch.tensor(first["grids"][f"{kind}/exact"])
                    figures[f"{kind}/floor"] = compare(exact, effects(result))
            row[noise_name] = figures
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        g = row["gaussian"]
        print(f"[{number + 1}/{len(records)}] {subject!r}: hybrid {g['hybrid_seconds']:.1f} s "
              f"({g['hybrid_exact_cells']} of {g['cells']} cells exact); "
              + " ".join(f"{k} recall {g[f'{k}/hybrid']['recall']:.1f} floor "
                         f"{g[f'{k}/floor']['recall']:.1f}" for k in ("hidden", "mlp")
                         if f"{k}/floor" in g), flush=True)


def report_second(path: Path, first: list[dict]) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["known_id"]: r for r in first}
    meta = rows[0]["gaussian"]["hybrid_meta"]
    print(f"\nsecond pass, {len(rows)} facts: hybrid = trace(method='hybrid') with the "
          f"library's defaults (verify {meta['verify']} per token, verify_best "
          f"{meta['verify_best']}, steps {meta['steps']}); floor = an exact trace with other "
          f"noise draws (seed + 1) against the first exact trace (what recall and Spearman "
          f"mean when the exact grid itself is redrawn); speed-up against the first pass's "
          f"exact trace, with the plain estimate re-timed here as a control (first pass / "
          f"this pass)")
    for noise in ("gaussian", "swap"):
        have = [r for r in rows if noise in r]
        if not have:
            continue
        exact = statistics.mean(by_id[r["known_id"]][noise]["exact_seconds"] for r in have)
        hybrid = statistics.mean(r[noise]["hybrid_seconds"] for r in have)
        control = statistics.mean(by_id[r["known_id"]][noise]["steps1_seconds"] for r in have) / \
            statistics.mean(r[noise]["steps1_seconds"] for r in have)
        share = sum(r[noise]["hybrid_exact_cells"] for r in have) / sum(
            r[noise]["cells"] for r in have)
        print(f"\n{noise}: exact trace {exact:.1f} s per fact (first pass); hybrid {hybrid:.2f} s "
              f"per fact, {exact / hybrid:.1f}x faster, {share:.0%} of cells exact; timing "
              f"control {control:.2f}")
        print("| kind | method | Spearman mean | recall@10/20 mean | facts with recall >= 0.8 |")
        print("| --- | --- | --- | --- | --- |")
        kinds = [k.split("/")[0] for k in have[0][noise] if k.endswith("/hybrid")]
        for kind in kinds:
            for method in ("hybrid", "floor"):
                key = f"{kind}/{method}"
                found = [r[noise][key] for r in have if key in r[noise]]
                if found:
                    print(f"| {kind} | {method} | "
                          f"{statistics.mean(f['spearman'] for f in found):.3f} | "
                          f"{statistics.mean(f['recall'] for f in found):.3f} | "
                          f"{sum(f['recall'] >= 0.8 for f in found)}/{len(found)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", default=str(DEFAULT_FACTS))
    parser.add_argument("--n", type=int, default=30, help="facts (answered correctly)")
    parser.add_argument("--samples", type=int, default=3,
                        help="noise samples (and swap subjects), shared by every method")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--kinds", default="hidden,mlp,attn", help="kinds with Gaussian noise")
    parser.add_argument("--steps", default="1,2,4,8,16",
                        help="integrated-gradient points of the estimates measured")
    parser.add_argument("--verify", default="",
                        help="verify+verify_best of the hybrid traces run (comma-separated)")
    parser.add_argument("--hybrid-steps", type=int, default=4,
                        help="integrated-gradient points of the hybrid traces run")
    parser.add_argument("--report-verify", default="1+0,0+0.05,0+0.1,0+0.15,0+0.2,1+0.15",
                        help="verify+verify_best of the hybrids merged from the stored grids "
                             "in the report")
    parser.add_argument("--no-swap", action="store_true", help="Gaussian noise only")
    parser.add_argument("--swap-kinds", default="hidden",
                        help="kinds traced with symmetric token replacement too")
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no new fact after this many minutes (rerun to resume)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "runs" / "attribution_quality_ig"))
    parser.add_argument("--report", action="store_true", help="print the table of OUT only")
    parser.add_argument("--second-pass", action="store_true",
                        help="the library's hybrid, a timing control and the noise floor for "
                             "the facts of OUT (second.jsonl)")
    args = parser.parse_args()
    if args.second_pass:
        second_pass(args)
    elif args.report:
        report(Path(args.out) / "facts.jsonl", args)
    else:
        run(args)


if __name__ == "__main__":
    main()
