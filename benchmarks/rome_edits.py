"""Acceptance run for ROME on the embedded SmolLM2: quality and time of 30 edits.

From /work/shared/data/known_facts.json it takes facts the model answers
correctly (its most likely next token is the object's first token), whose
relation has other prompt templates (paraphrases) and another subject with
the same object (neighbours).  Each is edited in turn, its counterfactual
target the object of another fact of the same relation, measured, and
reverted before the next.  For each case, as in CounterFact:

- efficacy: the new object is more probable than the old on the edit prompt;
- paraphrase: the same, on the subject under the relation's other templates;
- neighbourhood: other subjects with the same relation and object still
  prefer the old object.

"More probable" compares mean per-token log-probabilities of the two objects
(the paper's measure).  Paraphrase and neighbourhood scores are the fraction
of a case's prompts that pass, averaged over cases.  The unedited model is
scored the same way.

Run: ``.venv/bin/python benchmarks/rome_edits.py`` (about 15 minutes on a
2-core CPU with the paper's defaults once the layer's key statistics are cached;
the first run computes them, about 4 minutes).  ``--variants paper speed ...``
edits the same cases with several hyper-parameter sets side by side.  ``--choose-layer`` instead runs the MLP causal trace
behind the default edit layer and writes docs/figures/editing_layer_*.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KNOWN_FACTS = ROOT.parent / "shared" / "data" / "known_facts.json"
FIGURES = ROOT / "docs" / "figures"


def load_facts(path: Path) -> list[dict]:
    if not path.exists():
        sys.exit(f"error: {path} is absent (the shared data folder is not beside the project)")
    return json.loads(path.read_text())


def answered_correctly(model, facts: list[dict], batch_size: int = 32) -> list[dict]:
    """Facts whose object's first token is the model's most likely next token."""
    from lens_rome import adapter_for

    tokenizer, adapter = model.tokenizer, adapter_for(model)
    good = []
    with torch.no_grad():
        for i in range(0, len(facts), batch_size):
            chunk = facts[i:i + batch_size]
            rows = [adapter.tokenize(f["prompt"])[0][0].tolist() for f in chunk]  # BOS if needed
            width = max(map(len, rows))
            logits = model(torch.tensor([r + [0] * (width - len(r)) for r in rows]))
            for j, (fact, row) in enumerate(zip(chunk, rows)):
                first = tokenizer(" " + fact["attribute"], add_special_tokens=False)["input_ids"][0]
                if int(logits[j, len(row) - 1].argmax()) == first:
                    good.append(fact)
    return good


def build_cases(model, facts: list[dict], n: int, seed: int, max_prompts: int) -> list[dict]:
    by_relation = defaultdict(list)
    for fact in facts:
        by_relation[fact["relation_id"]].append(fact)
    rng = random.Random(seed)
    cases = []
    correct = answered_correctly(model, facts)
    rng.shuffle(correct)
    for fact in correct:
        relation = by_relation[fact["relation_id"]]
        subject, old = fact["subject"], fact["attribute"]
        templates = sorted({f["template"] for f in relation})
        paraphrases = [t.replace("{}", subject) for t in templates
                       if t != fact["template"] and t.replace("{}", subject) != fact["prompt"]]
        neighbours = sorted({f["prompt"] for f in relation
                             if f["attribute"] == old and f["subject"] != subject})
        others = sorted({f["attribute"] for f in relation} - {old})
        if not paraphrases or not neighbours or not others:
            continue
        cases.append({
            "known_id": fact["known_id"],
            "request": {"prompt": fact["prompt"].replace(subject, "{}", 1), "subject": subject,
                        "target_new": " " + rng.choice(others), "target_true": " " + old},
            "paraphrases": paraphrases[:max_prompts],
            "neighbours": neighbours[:max_prompts],
        })
        if len(cases) == n:
            break
    return cases


def score(model, case: dict) -> dict:
    from lens_rome.evaluation import target_log_probs

    request = case["request"]
    prompts = [request["prompt"].replace("{}", request["subject"])]
    prompts += case["paraphrases"] + case["neighbours"]
    lp = target_log_probs(model, prompts, [request["target_new"], request["target_true"]])
    new_wins = (lp[:, 0] > lp[:, 1]).float()
    n_para = len(case["paraphrases"])
    return {
        "efficacy": float(new_wins[0]),
        "paraphrase": float(new_wins[1:1 + n_para].mean()),
        "neighbourhood": float(1 - new_wins[1 + n_para:].mean()),
        "margin": float(lp[0, 0] - lp[0, 1]),
    }


def mean(rows: list[dict], key: str) -> float:
    return 100 * sum(r[key] for r in rows) / len(rows)


# Named hyper-parameter changes that --variants compares with the paper's algorithm, on the
# same cases in one run.  "objective-0.1" is lens_rome 0.1's v* objective (all four
# departures and its learning rate); "speed" only its two speed-ups.
VARIANTS = {
    "paper": {},
    "objective-0.1": {"kl_direction": "original_edited", "kl_position": "last",
                      "weight_decay_form": "squared", "early_stop_nll": 0.2, "v_lr": 1.0},
    "speed": {"early_stop_nll": 0.2, "v_lr": 1.0},
    "kl-reversed": {"kl_direction": "original_edited"},
    "kl-last": {"kl_position": "last"},
    "decay-squared": {"weight_decay_form": "squared"},
}


def run_edits(args) -> None:
    from lens_rome import RomeHyperParams, load_model
    from lens_rome.editing import key_statistics, rome
    from lens_rome.editing.prefixes import context_prefixes
    from lens_rome.model.precision import precision_name, probe_report, resolve_bf16

    model = load_model(args.model, backend=args.backend)
    hp = RomeHyperParams.for_model(model, **{
        k: v for k, v in {
            "layer": args.layer, "lookup": args.lookup, "v_steps": args.v_steps,
            "v_lr": args.v_lr, "kl_weight": args.kl_weight, "weight_decay": args.weight_decay,
            "clamp_norm": args.clamp_norm, "n_prefixes": args.n_prefixes,
            "early_stop_loss": args.early_stop_loss, "early_stop_nll": args.early_stop_nll,
            "bf16": args.bf16,
        }.items() if v is not None})
    cases = build_cases(model, load_facts(Path(args.facts)), args.skip + args.n, args.seed,
                        args.max_prompts)[args.skip:]
    probe = probe_report()
    precision = precision_name(resolve_bf16(hp.bf16, what="benchmarks/rome_edits.py"))
    from lens_rome.model.backend import TRANSFORMER_LENS_VERSION

    print(f"model {args.model} ({type(model).__name__}, transformer-lens "
          f"{TRANSFORMER_LENS_VERSION}), {len(cases)} cases; CPU {probe['cpu']}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"bfloat16 probe: {'fast' if probe['bf16_fast'] else 'slow'} ({probe['rule']}); "
          f"v* loop precision: {precision} (bf16={hp.bf16})")
    print(f"hyper-parameters: {hp.to_dict()}")

    start = time.perf_counter()
    stats = key_statistics(model, hp.layer, samples=hp.stats_samples,
                           token_length=hp.stats_token_length, progress=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    stats = key_statistics(model, hp.layer, samples=hp.stats_samples,
                           token_length=hp.stats_token_length, progress=False)
    cached_load = time.perf_counter() - start
    computed = stats.meta.get("seconds", first)
    print(f"key statistics, layer {hp.layer}: {stats.count} keys "
          f"({hp.stats_samples} chunks x {hp.stats_token_length} tokens of Wikipedia); "
          f"computed once in {computed:.1f} s; loaded from the cache in {cached_load:.2f} s")

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    context_prefixes(model, hp.n_prefixes, hp.prefix_lengths, hp.seed)  # once per model
    variants = {name: hp.replace(**VARIANTS[name]) for name in args.variants}
    unedited = []
    edited = {name: [] for name in variants}
    seconds = {name: [] for name in variants}
    steps = {name: [] for name in variants}
    print(f"\n{'id':>4} {'subject':28} {'old -> new':34} {'variant':>14} {'lookup':>10} "
          f"{'eff':>4} {'para':>5} {'neigh':>5} {'steps':>5} {'s':>5}")
    for case in cases:
        unedited.append(score(model, case))
        for name, variant in variants.items():  # each variant edits, is scored, reverts
            start = time.perf_counter()
            change = rome.edit(model, case["request"], hparams=variant, stats=stats)
            seconds[name].append(time.perf_counter() - start)
            steps[name].append(len(change.info["v_history"]))
            result = score(model, case)
            change.revert()
            edited[name].append(result)
            req = case["request"]
            print(f"{case['known_id']:>4} {req['subject'][:28]:28} "
                  f"{(req['target_true'] + ' ->' + req['target_new'])[:34]:34} {name:>14} "
                  f"{change.info['lookup_token'][:10]:>10} {result['efficacy']:4.0f} "
                  f"{result['paraphrase']:5.2f} {result['neighbourhood']:5.2f} "
                  f"{steps[name][-1]:5d} {seconds[name][-1]:5.1f}", flush=True)
    exact = all(torch.equal(before[name], p) for name, p in model.named_parameters())

    print(f"\n{'':30} {'efficacy':>9} {'paraphrase':>11} {'neighbourhood':>14} "
          f"{'median s/edit':>14} {'median steps':>13}")
    print(f"{'unedited model':30} {mean(unedited, 'efficacy'):8.1f}% "
          f"{mean(unedited, 'paraphrase'):10.1f}% {mean(unedited, 'neighbourhood'):13.1f}%")
    for name, rows in edited.items():
        label = f"ROME, layer {hp.layer}, {name}"
        print(f"{label:30} {mean(rows, 'efficacy'):8.1f}% {mean(rows, 'paraphrase'):10.1f}% "
              f"{mean(rows, 'neighbourhood'):13.1f}% {statistics.median(seconds[name]):14.1f} "
              f"{statistics.median(steps[name]):13.0f}")
    for name in variants:
        print(f"\n{name}: time per edit (statistics excluded, {precision}): median "
              f"{statistics.median(seconds[name]):.1f} s, mean {statistics.mean(seconds[name]):.1f}"
              f" s, max {max(seconds[name]):.1f} s; v* steps: median "
              f"{statistics.median(steps[name]):.0f}, max {max(steps[name])}")
    print(f"one-time key statistics for layer {hp.layer}: {computed:.1f} s; "
          f"cached load: {cached_load:.2f} s")
    print(f"every parameter bit-exact after the {len(cases) * len(variants)} reverts: {exact}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "hparams": {name: v.to_dict() for name, v in variants.items()}, "cases": cases,
            "edited": edited, "unedited": unedited, "seconds": seconds, "steps": steps,
            "precision": precision, "stats_seconds": computed, "cached_load": cached_load},
            indent=1))


def choose_layer(args) -> None:
    """Average MLP indirect effect by layer at the first and last subject token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lens_rome import load_model, trace

    model = load_model(args.model, backend=args.backend)
    facts = answered_correctly(model, load_facts(Path(args.facts)))
    random.Random(args.seed).shuffle(facts)
    facts = facts[:args.n]
    n_layers = model.cfg.n_layers
    first, last = torch.zeros(n_layers), torch.zeros(n_layers)
    start = time.perf_counter()
    for fact in facts:
        result = trace(model, fact["prompt"], fact["subject"], "mlp", samples=args.samples,
                       window=args.window, target=" " + fact["attribute"])
        s, e = result.subject_range
        first += result.indirect_effect[s] / len(facts)
        last += result.indirect_effect[e - 1] / len(facts)
    seconds = time.perf_counter() - start
    print(f"{len(facts)} correctly answered facts, MLP window {args.window}, "
          f"{args.samples} noise samples, {seconds:.0f} s")
    print(f"{'layer':>5} {'AIE first subject token':>24} {'AIE last subject token':>24}")
    for layer in range(n_layers):
        print(f"{layer:5d} {first[layer]:24.4f} {last[layer]:24.4f}")
    print(f"peak at the last subject token: layer {int(last.argmax())}; "
          f"at the first: layer {int(first.argmax())}")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(n_layers), first.numpy(), label="first subject token")
    ax.plot(range(n_layers), last.numpy(), label="last subject token")
    ax.set_xlabel("MLP layer (centre of a window of %d)" % args.window)
    ax.set_ylabel("average indirect effect")
    ax.set_title(f"{args.model}: restoring MLP outputs, {len(facts)} facts")
    ax.legend()
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    out = FIGURES / f"editing_layer_{args.model}.png"
    fig.savefig(out, dpi=120)
    (FIGURES / f"editing_layer_{args.model}.json").write_text(json.dumps({
        "facts": [f["known_id"] for f in facts], "window": args.window, "samples": args.samples,
        "aie_first_subject_token": first.tolist(), "aie_last_subject_token": last.tolist()}))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backend", choices=("hooked", "bridge"), default=None,
                        help="default: hooked on TransformerLens 3.x, bridge on 4.x")
    parser.add_argument("--facts", default=str(KNOWN_FACTS))
    parser.add_argument("--n", type=int, default=30, help="cases (facts) to edit or trace")
    parser.add_argument("--seed", type=int, default=0, help="picks the facts and new objects")
    parser.add_argument("--skip", type=int, default=0,
                        help="leave out the first N cases of the seed's order (e.g. those a "
                             "setting was chosen on), so the run is on held-out facts")
    parser.add_argument("--max-prompts", type=int, default=10,
                        help="at most this many paraphrase and neighbour prompts per case")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids slow-downs on a busy machine)")
    parser.add_argument("--json", help="also write the per-case results here")
    for name, kind in (("layer", int), ("v-steps", int), ("v-lr", float), ("kl-weight", float),
                       ("weight-decay", float), ("clamp-norm", float), ("n-prefixes", int),
                       ("early-stop-loss", float), ("early-stop-nll", float)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--variants", nargs="+", default=["paper"], choices=sorted(VARIANTS),
                        help="hyper-parameter variants edited side by side on the same cases "
                             "('paper': the defaults; see VARIANTS)")
    parser.add_argument("--lookup", default=None,
                        help="subject_last, subject_first, last, or a token index")
    parser.add_argument("--choose-layer", action="store_true",
                        help="run the MLP causal trace that picks the default edit layer")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    if args.lookup is not None and args.lookup.lstrip("-").isdigit():
        args.lookup = int(args.lookup)
    if args.threads:
        torch.set_num_threads(args.threads)
    choose_layer(args) if args.choose_layer else run_edits(args)


if __name__ == "__main__":
    main()
