"""The comparison tables of docs/evaluation.md: rome, memit, ft, ft-l and none on the embedded
model, teacher-forced and generated, CounterFact+ and perplexity.

Builds CounterFact-format cases from ../shared/data/known_facts.json with
:func:`lens_rome.data.build_counterfact` (facts SmolLM2 answers
correctly; the counterfactual target is another fact's object of the same
relation; two generation prompts per case), writes them to
``OUT/cases.json`` (and what they were built from, checked when a rerun
reuses them, in ``OUT/cases_source.json``), and evaluates every method over the same cases with
:func:`lens_rome.evaluation.evaluate`, each into ``OUT/<method>/`` (so an
interrupted run resumes where it stopped).  Prints two markdown tables: the
paper's teacher-forced metrics with fluency and consistency, and the protocols
side by side (teacher-forced and generated efficacy, paraphrase and
neighbourhood, CounterFact+'s NS+ and neighbourhood KL, perplexity of held-out
text before and after the edits).  ``--methods`` with no name only builds
``OUT/cases.json`` (for ``lens-rome evaluate --dataset OUT/cases.json ...``);
``--report`` only prints the tables of the finished runs.

Run: ``.venv/bin/python benchmarks/evaluate_methods.py --n 100 --out eval_methods``
(about 40 minutes on a 2-core CPU; ROME's key statistics for layer 5 are
computed once, ~2 minutes, and cached).
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KNOWN_FACTS = ROOT.parent / "shared" / "data" / "known_facts.json"
METHODS = ("none", "ft", "ft-l", "rome", "memit")
DEFAULT_N = 100
SOURCE = "cases_source.json"  # what OUT/cases.json was built from
COLUMNS = (("S", "score"), ("ES", "efficacy_score"), ("PS", "paraphrase_score"),
           ("NS", "neighborhood_score"), ("EM", "efficacy_magnitude"),
           ("PM", "paraphrase_magnitude"), ("NM", "neighborhood_magnitude"),
           ("fluency", "fluency"), ("consistency", "consistency"))


# (column, summary key): the protocols side by side; tf teacher-forced, gen generated (greedy)
PROTOCOL_COLUMNS = (("S tf", "score"), ("S gen", "generated_score"),
                    ("ES tf", "efficacy_score"), ("ES gen", "generated_efficacy"),
                    ("o gone", "generated_efficacy_true_gone"),
                    ("PS tf", "paraphrase_score"), ("PS gen", "generated_paraphrase"),
                    ("NS tf", "neighborhood_score"), ("NS gen", "generated_neighborhood"),
                    ("NS unchanged", "generated_neighborhood_unchanged"),
                    ("NS+", "neighborhood_plus_score"), ("KL+", "neighborhood_plus_kl"),
                    ("ppl before", "perplexity_unedited"), ("ppl after", "perplexity"),
                    ("ppl max", "perplexity_max"))


def table(rows: dict[str, dict], seconds: dict[str, float],
          columns: tuple[tuple[str, str], ...] = COLUMNS) -> str:
    head = "| method | " + " | ".join(c for c, _ in columns) + " | s / case |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for method, summary in rows.items():
        cells = ["n/a" if summary.get(k) is None else
                 f"{summary[k]:.{3 if k.endswith('_kl') else 2 if 'perplexity' in k else 1}f}"
                 for _, k in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds[method]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None,
                        help="cases (default: 100; with --report, as many as --out holds)")
    parser.add_argument("--out", default="eval_methods", help="output folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", default=str(KNOWN_FACTS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-new-tokens", type=int, default=100,
                        help="tokens generated per generation prompt (default: %(default)s, "
                             "the paper's)")
    parser.add_argument("--generation-prompts", type=int, default=2,
                        help="generation prompts per case (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="picks facts, targets, samples")
    parser.add_argument("--methods", nargs="*", default=["none", "rome", "memit", "ft-l"],
                        choices=METHODS, help="(default: %(default)s; none named: only build "
                                              "the cases)")
    parser.add_argument("--answer-tokens", type=int, default=10,
                        help="greedy tokens per prompt, the generated protocol")
    parser.add_argument("--perplexity-chunks", type=int, default=4,
                        help="held-out text for perplexity, in chunks of 128 tokens")
    parser.add_argument("--report", action="store_true",
                        help="only print the tables of the finished runs in --out")
    args = parser.parse_args()
    if not Path(args.facts).exists():
        sys.exit(f"error: {args.facts} is absent (is the shared data folder beside the project?)")
    out = Path(args.out)
    cases_file = out / "cases.json"
    if args.report and not cases_file.exists():
        sys.exit(f"error: {cases_file} is absent: --report prints the runs in --out, and "
                 f"{out} holds none; run without --report first, or name the folder that does")
    if args.n is None:  # a report covers every case the run in --out was built with
        built_n = json.loads((out / SOURCE).read_text())["n"] \
            if args.report and (out / SOURCE).exists() else None
        args.n = built_n or DEFAULT_N
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from lens_rome import load_model
    from lens_rome.data import build_counterfact, load_counterfact, save_cases
    from lens_rome.evaluation import evaluate, load_records
    from lens_rome.storage import check_resumable, content_hash, write_json

    with contextlib.redirect_stdout(io.StringIO()):
        model = load_model(args.model)
    source = {"model": args.model, "facts": content_hash(json.loads(Path(args.facts).read_text())),
              "n": args.n, "seed": args.seed, "generation_prompts": args.generation_prompts}
    if cases_file.exists():  # a resumed run uses exactly the cases it started with
        built = json.loads((out / SOURCE).read_text()) if (out / SOURCE).exists() else None
        if built is None:
            print(f"warning: {cases_file} was written by an older version of this script that "
                  f"did not record what it was built from; it cannot be checked", flush=True)
        else:  # fewer cases than were built are a prefix of them
            check_resumable(out, {**source, "n": max(args.n, built["n"])}, built,
                            fix="choose another --out")
        cases = load_counterfact(cases_file)
    else:
        write_json(out / SOURCE, source)
        start = time.perf_counter()
        cases = build_counterfact(args.facts, model, n=args.n, seed=args.seed,
                                  generation_prompts=args.generation_prompts)
        save_cases(cases, cases_file)
        print(f"built {len(cases)} cases in {time.perf_counter() - start:.0f} s -> {cases_file}")
    cases = cases[:args.n]
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, {len(cases)} cases, "
          f"{args.max_new_tokens} generated tokens x {args.generation_prompts} prompts per case")

    rows, seconds = {}, {}
    methods = [m for m in METHODS if (out / m / "summary.json").exists()] if args.report \
        else args.methods
    for method in methods:
        start = time.perf_counter()
        if args.report:
            rows[method] = json.loads((out / method / "summary.json").read_text())
        else:
            rows[method] = evaluate(model, cases, method, out / method,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed,
                                    answer_tokens=args.answer_tokens,
                                    perplexity_chunks=args.perplexity_chunks)
            print(f"{method}: {time.perf_counter() - start:.0f} s this run", flush=True)
        seconds[method] = float(np.mean([r["seconds"] for r in load_records(out / method, cases)]))
    if rows:
        print("\nThe paper's metrics: teacher-forced; fluency and consistency from sampled text")
        print(table(rows, seconds))
        print("\nBoth protocols: tf teacher-forced, gen generated (greedy); NS+ CounterFact+ "
              "(teacher-forced); KL+ its next-token KL from the unedited model (nats); ppl "
              "perplexity of held-out text")
        print(table(rows, seconds, PROTOCOL_COLUMNS))


if __name__ == "__main__":
    main()
