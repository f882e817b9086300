"""ROME's default edit against the paper's code, case by case, on the embedded SmolLM2.

For each of ``--n`` CounterFact-format cases built from ../shared/data/known_facts.json
(:func:`lens_rome.data.build_counterfact`, seed 0, facts SmolLM2 answers correctly),
edits layer 5 with ``rome.edit`` (the paper's algorithm, the four fixed text prefixes
of tests/editing/test_rome_oracle.py, the cached key statistics) and with
:func:`lens_rome.reference.rome_weight_change` (the paper's ``compute_u`` /
``compute_v`` / update transcribed onto TransformerLens hooks, no lens_rome editing
code), and prints the relative Frobenius difference of the two weight changes and the
v* steps each took.

Run: ``.venv/bin/python benchmarks/rome_oracle.py --n 4 --threads 1``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lens_rome import load_model
from lens_rome.data import build_counterfact
from lens_rome.editing import key_statistics, rome
from lens_rome.model.adapter import adapter_for
from lens_rome.reference import rome_weight_change

KNOWN_FACTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "known_facts.json"
PREFIXES = ("The city was quiet", "Because it rained all day", "I think", "You know what")
LAYER = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m")
    stats = key_statistics(model, LAYER, progress=False)
    weight = adapter_for(model).w_out(LAYER)
    cases = build_counterfact(KNOWN_FACTS, model, n=args.n, seed=0)
    print(f"SmolLM2 layer {LAYER}, {len(cases)} cases, key statistics from {stats.count} keys")
    differences = []
    for case in cases:
        request = {"prompt": case.prompt, "subject": case.subject,
                   "target_new": case.request.target_new}
        before = weight.detach().clone()
        with rome.edited(model, request, layer=LAYER, stats=stats, prefixes=PREFIXES) as change:
            ours = (weight.detach() - before).double()
            steps = len(change.info["v_history"])
        history = []
        theirs = rome_weight_change(model, model.tokenizer, request, LAYER, PREFIXES,
                                    stats.second_moment, history=history).double()
        differences.append(float((ours - theirs).norm() / theirs.norm()))
        print(f"{case.case_id:>5} {case.subject[:28]:28} -> {request['target_new']!r:14} "
              f"relative Frobenius difference {differences[-1]:.2e}, v* steps {steps} "
              f"(paper's code: {len(history)})", flush=True)
    print(f"largest: {max(differences):.2e}")


if __name__ == "__main__":
    main()
