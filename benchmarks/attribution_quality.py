"""How good, and how fast, is attribution patching against the exact causal trace?

For each fact the embedded SmolLM2 answers correctly (known facts, the paper's
filter), in order, this runs the exact trace (``trace_many``, all kinds with
the same noise) and the attribution estimate (``attribute_many``: plain, with
the QK fix, with GradDrop) with the same noise draws and the same metric, the
answer's log-probability, and compares them per kind:

- Spearman correlation of estimated and exact indirect effects over every
  (token, layer) cell from the first subject token on (cells before the subject
  are 0 in both and left out);
- recall: the fraction of the exact top-10 sites (highest scores) found among
  the estimate's top-20;
- seconds per fact for the exact trace and for each estimate (all kinds
  together, as each computes them together).

Kinds: hidden, mlp and attn with the trace's window (10), and ``mlp@1``:
single MLP layers (window 1), where no restored layer feeds another.  GradDrop
is measured with Gaussian noise only (it costs one backward pass per layer).

Two corruptions: Gaussian noise at 3x the std of the facts' subject-token
embeddings (the paper's), and symmetric token replacement (``SubjectSwap``: up
to 10 other subjects of the file with the same number of tokens and another
answer, one per sample; Zhang & Nanda 2023).  With ``--heads N`` the first N
facts also get the per-head kind (exact: ``trace(kind="head")``).

Each fact's figures are appended to ``OUT/facts.jsonl`` as soon as they are
measured; rerunning resumes (``OUT/run.json`` records the settings and a hash
of the facts file and of each fact: a rerun with other ones is refused).  The table is printed at the end (``--report``
prints it from the file without computing).

    .venv/bin/python benchmarks/attribution_quality.py --n 30 --threads 1 --samples 3 --swap-kinds hidden
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FACTS = ROOT.parent / "shared" / "data" / "known_facts.json"
KINDS = ("hidden", "mlp", "attn")
VARIANTS = {"plain": {}, "qk_fix": {"qk_fix": True}, "grad_drop": {"grad_drop": True}}
TOP, WITHIN = 10, 20


def top_sites(scores: torch.Tensor, start: int, n: int) -> set[tuple[int, ...]]:
    grid = scores[start:]
    order = grid.flatten().argsort(descending=True, stable=True)[:n].tolist()
    return {tuple(int(i) for i in torch.unravel_index(torch.tensor(f), grid.shape)) for f in order}


def compare(exact, estimate) -> dict:
    from lens_rome.tracing import spearman

    start = exact.subject_range[0]
    a = (estimate.scores - estimate.low_score)[start:].flatten()
    b = (exact.scores - exact.low_score)[start:].flatten()
    found = top_sites(exact.scores, start, TOP) & top_sites(estimate.scores, start, WITHIN)
    return {"spearman": spearman(a, b), "recall": len(found) / TOP,
            "sign": float(((a > 0) == (b > 0)).float().mean())}


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
        if other["attribute"] == fact["attribute"] or subject in chosen or subject == fact["subject"]:
            continue
        n = adapter.tokenize(subject)[0].shape[1] - int(adapter.prepend_bos)
        if n == end - start:
            chosen.append(subject)
        if len(chosen) == limit:
            break
    return chosen


def measure(model, fact, noise, samples, window, kinds, heads: bool, variants,
            single: bool = True) -> dict:
    """Exact traces and estimates of one fact with one corruption: the row of figures, and
    the exact results (``kinds`` in order)."""
    from lens_rome.tracing import attribute_many, trace, trace_many

    seed = int(fact["known_id"])
    common = dict(samples=samples, seed=seed, metric="logprob")
    prompt, subject = fact["prompt"], fact["subject"]
    start = time.perf_counter()
    exact = trace_many(model, prompt, subject, [(k, None, None) for k in kinds],
                       noise=noise, window=window, **common)
    row = {"exact_seconds": time.perf_counter() - start, "clean": exact[0].high_score,
           "corrupted": exact[0].low_score, "answer": exact[0].answer}
    if single:  # single MLP layers: no window
        start = time.perf_counter()
        exact_single = trace(model, prompt, subject, "mlp", noise=noise, window=1, **common)
        row["exact_mlp@1_seconds"] = time.perf_counter() - start
    if heads:
        start = time.perf_counter()
        exact_heads = trace(model, prompt, subject, "head", noise=noise, **common)
        row["exact_head_seconds"] = time.perf_counter() - start
    target = exact[0].answer_token
    for variant in variants:
        options = VARIANTS[variant]
        start = time.perf_counter()
        estimates = attribute_many(model, prompt, subject, kinds, noise=noise,
                                   window=window, target=target, **common, **options)
        row[f"{variant}_seconds"] = time.perf_counter() - start
        assert abs(estimates[0].low_score - exact[0].low_score) < 1e-3, "not the same noise"
        for kind, result, estimate in zip(kinds, exact, estimates):
            row[f"{kind}/{variant}"] = compare(result, estimate)
        if single and variant != "grad_drop":  # GradDrop: n_layers more backward passes
            one_layer, = attribute_many(model, prompt, subject, ["mlp"], noise=noise,
                                        window=1, target=target, **common, **options)
            row[f"mlp@1/{variant}"] = compare(exact_single, one_layer)
        if heads:
            start = time.perf_counter()
            head, = attribute_many(model, prompt, subject, ["head"], noise=noise,
                                   target=target, **common, **options)
            row[f"head_{variant}_seconds"] = time.perf_counter() - start
            row[f"head/{variant}"] = compare(exact_heads, head)
    if "mlp" in kinds and window > 1:
        result = exact[list(kinds).index("mlp")]
        for rule, estimate in window_rules(model, prompt, subject, noise, samples, seed, window,
                                           target, result.subject_range[0]).items():
            row[f"mlp/{rule}"] = compare(result, estimate)
    for kind, result in zip(kinds, exact):
        row[f"{kind}/peak"] = subject_peak(result)
    return row, exact


def window_rules(model, prompt, subject, noise, samples, seed, window, target, start) -> dict:
    """Two other first-order estimates of restoring a window of MLP outputs at a token
    (an experiment; the library adds the layers' estimates, ``plain``):

    - ``blocked``: a restored layer's gradient loses the paths through the later MLPs of the
      window at the same token (restored, so clamped), each taken as one step
      ``dM/dresid_mid(l') - dM/dresid_post(l')`` along the residual stream;
    - ``top``: every restored difference is added at the top of the window (the gradient
      at the window's last layer), ignoring what attention in between does with it.
    """
    from types import SimpleNamespace

    from lens_rome import adapter_for
    from lens_rome.tracing import window_layers
    from lens_rome.tracing.attribution import _prepare, _run  # no public equivalent

    adapter = adapter_for(model)
    n_layers = adapter.n_layers
    prepared = _prepare(adapter, prompt, subject, noise, samples, seed, target)
    names = [f"blocks.{l}.{hook}" for hook in ("hook_mlp_out", "hook_resid_mid",
                                                "hook_resid_post") for l in range(n_layers)]
    runs = _run(adapter, prepared, names, "logprob", None, False)
    grads = runs.grads[0]
    diff = torch.stack([runs.clean[f"blocks.{l}.hook_mlp_out"]
                        - runs.corrupted[f"blocks.{l}.hook_mlp_out"] for l in range(n_layers)], 2)
    post = torch.stack([grads[f"blocks.{l}.hook_resid_post"] for l in range(n_layers)], 2)
    through = torch.stack([grads[f"blocks.{l}.hook_resid_mid"] - grads[f"blocks.{l}.hook_resid_post"]
                           for l in range(n_layers)], 2)  # [samples, pos, layer, d_model]
    shape = diff.shape[1:3]
    blocked, top = torch.zeros(shape), torch.zeros(shape)
    for centre in range(n_layers):
        layers = list(window_layers(centre, window, n_layers))
        total = 0
        for i, layer in enumerate(layers):
            total = total + (diff[:, :, layer] * (post[:, :, layer]
                                                  - through[:, :, layers[i + 1:]].sum(2))).sum(-1)
        blocked[:, centre] = total.mean(0)
        top[:, centre] = (diff[:, :, layers].sum(2) * post[:, :, layers[-1]]).sum(-1).mean(0)
    out = {}
    for rule, effect in (("blocked", blocked), ("top", top)):
        effect[:start] = 0.0
        out[rule] = SimpleNamespace(scores=effect + runs.low_score, low_score=runs.low_score)
    return out


def subject_peak(result) -> list[int]:
    """(token, layer) of the largest exact score at the subject's tokens."""
    start, end = result.subject_range
    grid = result.scores[start:end]
    token, layer = torch.unravel_index(grid.argmax(), grid.shape)
    return [int(token) + start, int(layer)]


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
    from lens_rome.tracing import Gaussian, SubjectSwap, embedding_std, spearman

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
    settings = {"samples": args.samples, "window": args.window, "swap_kinds": args.swap_kinds,
                "threads": torch.get_num_threads()}
    done = resumed(out, {**settings, "model": "smollm2-135m", "swap": not args.no_swap,
                         "heads": args.heads, "facts": content_hash(facts)},
                   {str(f["known_id"]): content_hash(f) for f in kept})
    level = 3.0 * embedding_std(model, [f["subject"] for f in facts])
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; {len(kept)} facts; noise level {level:.4f}; "
          f"{len(done)} already measured in {store}", flush=True)
    for number, fact in enumerate(kept):
        if fact["known_id"] in done:
            continue
        if args.minutes and time.perf_counter() - began > 60 * args.minutes:
            print(f"stopping after {args.minutes} minutes; rerun to resume", flush=True)
            return
        heads = number < args.heads
        record = {"known_id": fact["known_id"], "subject": fact["subject"],
                  "prompt": fact["prompt"], "settings": settings}
        record["gaussian"], gaussian = measure(model, fact, Gaussian(level=level),
                                               args.samples, args.window, KINDS, heads,
                                               list(VARIANTS))
        if not args.no_swap:
            alternatives = swap_alternatives(model, fact, facts, limit=args.samples)
            record["swap_alternatives"] = alternatives
            if alternatives:
                swap_kinds = tuple(args.swap_kinds.split(","))
                record["swap"], swapped = measure(model, fact, SubjectSwap(alternatives),
                                                  len(alternatives), args.window, swap_kinds,
                                                  heads, ["plain", "qk_fix"], single=False)
                start = gaussian[0].subject_range[0]
                record["gaussian_vs_swap"] = {
                    kind: spearman((a.scores - a.low_score)[start:], (b.scores - b.low_score)[start:])
                    for kind, a, b in zip(swap_kinds, gaussian, swapped)}
        with store.open("a") as f:
            f.write(json.dumps(record) + "\n")
        g = record["gaussian"]
        print(f"[{number + 1}/{len(kept)}] {fact['subject']!r}: exact {g['exact_seconds']:.1f} s, "
              f"attribution {g['plain_seconds']:.2f} s; recall hidden "
              f"{g['hidden/plain']['recall']:.1f} mlp {g['mlp/plain']['recall']:.1f} "
              f"attn {g['attn/plain']['recall']:.1f}", flush=True)
    report(store, args)


def report(store: Path, args) -> None:
    records = [json.loads(line) for line in store.read_text().splitlines()]
    kept = [r["known_id"] for r in records]
    settings = records[0].get("settings", {"samples": args.samples, "window": args.window,
                                           "swap_kinds": "hidden,mlp,attn"})
    if any(r.get("settings", settings) != settings for r in records):
        print("warning: the records were measured with different settings", flush=True)
    print(f"\n{len(records)} facts (known_id {min(kept)}..{max(kept)}), samples "
          f"{settings['samples']} (swap: one per other subject, as many), window "
          f"{settings['window']} for mlp and attn (mlp@1: single MLP layers); swap kinds "
          f"{settings['swap_kinds']}; metric: log-probability of the answer; Spearman over "
          f"cells from the first subject token; recall = exact top-{TOP} within estimate "
          f"top-{WITHIN}; s per fact: the kinds of one noise rule together; speed-up: exact "
          f"seconds / estimate seconds")
    for noise in ("gaussian", "swap"):
        rows = [r[noise] for r in records if noise in r]
        if not rows:
            continue
        exact = statistics.mean(r["exact_seconds"] for r in rows)
        te = statistics.mean(r["clean"] - r["corrupted"] for r in rows)
        kinds = "+".join(k for k in KINDS if f"{k}/plain" in rows[0])
        print(f"\n{noise}: {len(rows)} facts; mean total effect (log p) {te:.2f}; exact trace "
              f"({kinds}) {exact:.1f} s per fact")
        print(f"| kind | variant | Spearman mean | Spearman median | recall@{TOP}/{WITHIN} mean "
              f"| facts with recall >= 0.8 | sign agreement | s per fact | speed-up |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for kind in (*KINDS, "mlp@1", "head"):
            for variant in (*VARIANTS, "blocked", "top"):
                key = f"{kind}/{variant}"
                found = [r for r in rows if key in r]
                if not found:
                    continue
                rho = [r[key]["spearman"] for r in found]
                recall = [r[key]["recall"] for r in found]
                sign = [r[key]["sign"] for r in found]
                good = sum(x >= 0.8 for x in recall)
                if variant in ("blocked", "top"):
                    timing = "- | -"
                elif kind in KINDS:  # all kinds in one call, against all of them exactly
                    seconds = statistics.mean(r[f"{variant}_seconds"] for r in found)
                    reference = statistics.mean(r["exact_seconds"] for r in found)
                    timing = f"{seconds:.2f} | {reference / seconds:.0f}x"
                elif kind == "head":
                    seconds = statistics.mean(r[f"head_{variant}_seconds"] for r in found)
                    reference = statistics.mean(r["exact_head_seconds"] for r in found)
                    timing = f"{seconds:.2f} | {reference / seconds:.0f}x"
                else:
                    timing = "- | -"
                print(f"| {kind} | {variant} | {statistics.mean(rho):.3f} | "
                      f"{statistics.median(rho):.3f} | {statistics.mean(recall):.3f} | "
                      f"{good}/{len(found)} | {statistics.mean(sign):.3f} | {timing} |")
        ranked = [k for k in ("hidden/plain", "mlp/plain") if k in rows[0]]
        worst = sorted(rows, key=lambda r: sum(r[k]["recall"] for k in ranked))
        print(f"lowest plain recall ({', '.join(ranked)}): " + "; ".join(
            f"{r['answer']!r} clean {r['clean']:.2f} corrupted {r['corrupted']:.2f} "
            + " ".join(f"{k} {r[k]['recall']:.1f}" for k in ranked) for r in worst[:5]))
    both = [r for r in records if "gaussian_vs_swap" in r]
    if both:
        print(f"\nexact traces, Gaussian noise vs symmetric token replacement, {len(both)} facts "
              f"(same facts, same metric):")
        print("| kind | Spearman of the two exact grids (mean) | same best subject site "
              "(token, layer) | same best subject token | mean |layer difference| |")
        print("| --- | --- | --- | --- | --- |")
        for kind in [k for k in KINDS if k in both[0]["gaussian_vs_swap"]]:
            rho = [r["gaussian_vs_swap"][kind] for r in both]
            peaks = [(r["gaussian"][f"{kind}/peak"], r["swap"][f"{kind}/peak"]) for r in both]
            same = sum(a == b for a, b in peaks)
            token = sum(a[0] == b[0] for a, b in peaks)
            shift = statistics.mean(abs(a[1] - b[1]) for a, b in peaks)
            print(f"| {kind} | {statistics.mean(rho):.3f} | {same}/{len(both)} | "
                  f"{token}/{len(both)} | {shift:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", default=str(DEFAULT_FACTS))
    parser.add_argument("--n", type=int, default=30, help="facts (answered correctly)")
    parser.add_argument("--samples", type=int, default=5,
                        help="noise samples (and swap subjects), shared by both methods")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--heads", type=int, default=0, metavar="N",
                        help="also trace heads exactly for the first N facts")
    parser.add_argument("--no-swap", action="store_true", help="Gaussian noise only")
    parser.add_argument("--swap-kinds", default="hidden,mlp",
                        help="kinds traced with symmetric token replacement too")
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no new fact after this many minutes (rerun to resume)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "runs" / "attribution_quality"))
    parser.add_argument("--report", action="store_true", help="print the table of OUT only")
    args = parser.parse_args()
    if args.report:
        report(Path(args.out) / "facts.jsonl", args)
    else:
        run(args)


if __name__ == "__main__":
    main()
