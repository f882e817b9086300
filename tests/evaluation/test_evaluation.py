"""Metrics against hand-computed values, the methods' reverts, and the resumable runner."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import CASES, FAST, counterfact_file

from lens_rome.cli import main
from lens_rome.data.cases import load_zsre
from lens_rome.data.known_facts import build_counterfact
from lens_rome.editing.finetune import FineTune
from lens_rome.editing.registry import METHODS, make_method
from lens_rome.editing.statistics import key_statistics
from lens_rome.evaluation import runner as evaluation
from lens_rome.evaluation.measures import generate, target_log_probs
from lens_rome.evaluation.runner import (
    COUNTERFACT_KEYS,
    RUN_KEYS,
    ZSRE_KEYS,
    evaluate,
    evaluate_case,
    load_records,
    summarize,
)
from lens_rome.evaluation.text import (
    Consistency,
    TfIdf,
    fluency,
    harmonic_mean,
    ngram_entropy,
)
from lens_rome.model import loading


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p), name


def without_times(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "edit_seconds")} for r in records]


# --------------------------------------------------------------------------- metrics by hand


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("a, b") == pytest.approx(((2 / 3) * 1 + (4 / 3) * 0) / 2)  # "," a word
    assert ngram_entropy("hello") == 0.0
    assert fluency(["a b a b", "hello"]) == pytest.approx(ngram_entropy("a b a b") / 2)


def test_harmonic_mean_by_hand():
    assert harmonic_mean([1, 2, 4]) == pytest.approx(3 / (1 + 1 / 2 + 1 / 4))
    assert harmonic_mean([100, 0, 50]) == 0.0
    assert math.isnan(harmonic_mean([1, math.nan]))


def test_tfidf_cosine_by_hand():
    tfidf = TfIdf(["apple banana", "apple cherry", "Apple"])
    # N = 3; df: apple 3, banana 1, cherry 1 -> idf 1 and ln(4/2) + 1
    rare = math.log(2) + 1
    assert tfidf.cosine("apple banana", "apple cherry") == pytest.approx(1 / (1 + rare ** 2))
    assert tfidf.cosine("banana banana", "Banana!") == pytest.approx(1.0)
    assert tfidf.cosine("durian", "apple") == 0.0  # unknown terms are ignored
    consistency = Consistency({" Rome ": "Rome is old", "Paris": "Paris is big"})
    assert consistency.text_about("rome") == "Rome is old"
    assert math.isnan(consistency.score(["anything"], "Seattle"))


def test_summarize_by_hand():
    lp = math.log
    records = [
        {"format": "counterfact", "rewrite": [[lp(0.6), lp(0.2)]],
         "paraphrase": [[lp(0.5), lp(0.3)], [lp(0.1), lp(0.3)]],
         "neighborhood": [[lp(0.1), lp(0.7)]], "fluency": 5.0, "consistency": 0.5},
        {"format": "counterfact", "rewrite": [[lp(0.1), lp(0.4)]],
         "paraphrase": [[lp(0.2), lp(0.4)]],
         "neighborhood": [[lp(0.5), lp(0.2)], [lp(0.1), lp(0.3)]], "fluency": 6.0,
         "consistency": None},
    ]
    summary = summarize(records)
    assert tuple(summary) == COUNTERFACT_KEYS
    assert summary["n"] == 2
    assert summary["efficacy_score"] == pytest.approx(50)
    assert summary["efficacy_magnitude"] == pytest.approx(100 * (0.4 - 0.3) / 2)
    assert summary["paraphrase_score"] == pytest.approx(100 * (0.5 + 0) / 2)
    assert summary["paraphrase_magnitude"] == pytest.approx(100 * ((0.2 - 0.2) / 2 - 0.2) / 2)
    assert summary["neighborhood_score"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert summary["neighborhood_magnitude"] == pytest.approx(100 * (0.6 + (-0.3 + 0.2) / 2) / 2)
    assert summary["score"] == pytest.approx(harmonic_mean([50, 25, 75]))
    assert summary["fluency"] == pytest.approx(550)
    assert summary["consistency"] == pytest.approx(50)  # the case without a reference is left out
    zsre = summarize([{"format": "zsre", "efficacy": [True, False], "paraphrase": [True],
                       "specificity": [False]}])
    assert zsre == {"n": 1, "efficacy": 50.0, "paraphrase": 100.0, "specificity": 0.0}


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("name", ["ft", "ft-l"])
def test_fine_tuning_reverts_bit_for_bit(tiny_llama, name):
    method = make_method(name, tiny_llama, layer=2, steps=5, lr=1e-2, norm_constraint=1e-3
                         if name == "ft-l" else None)
    before = snapshot(tiny_llama)
    prompt, target = "The Eiffel Tower is located in the city of", " Rome"
    old = target_log_probs(tiny_llama, [prompt], [target])
    change = method.apply(tiny_llama, {"prompt": "{} is located in the city of",
                                       "subject": "The Eiffel Tower", "target_new": target})
    delta = change.weight_delta()
    assert delta.abs().max() > 0
    if name == "ft-l":
        assert delta.abs().max() <= 1e-3 + 1e-7
    assert target_log_probs(tiny_llama, [prompt], [target]) > old
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"blocks.2.mlp.W_out"}
    assert not any(p.grad is not None for p in tiny_llama.parameters())
    change.revert()
    assert_same(tiny_llama, before)


def test_method_errors(tiny_gpt2):
    assert METHODS == ("rome", "r-rome", "memit", "alphaedit", "ft", "ft-l", "none")
    with pytest.raises(ValueError, match="unknown method 'mend'"):
        make_method("mend", tiny_gpt2)
    with pytest.raises(TypeError, match="unknown fine-tuning options"):
        make_method("ft", tiny_gpt2, layer=1, learning_rate=1)
    with pytest.raises(ValueError, match="out of range"):
        make_method("ft", tiny_gpt2, layer=99)
    assert isinstance(make_method("ft-l", tiny_gpt2, layer=1), FineTune)
    assert make_method("ft-l", tiny_gpt2, layer=1).params.norm_constraint > 0


# --------------------------------------------------------------------------- the runner


def test_generation_is_seeded_and_batched(tiny_gpt2):
    prompts = ["The Eiffel Tower is", "Miles Davis plays the trumpet and"]
    state = torch.random.get_rng_state()
    batch = generate(tiny_gpt2, prompts, 8, seed=[3, 4])
    assert batch == [generate(tiny_gpt2, p, 8, seed=s) for p, s in zip(prompts, [3, 4])]
    assert all(text.startswith(p) for text, p in zip(batch, prompts))
    assert torch.equal(state, torch.random.get_rng_state())


def test_evaluate_writes_cases_and_exact_summary(tiny_gpt2, tmp_path):
    summary = evaluate(tiny_gpt2, CASES, "ft", tmp_path,
                       method_options={"layer": 1, "lr": 1e-2}, **FAST)
    assert tuple(summary) == COUNTERFACT_KEYS + RUN_KEYS
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["n"] == summary["n_edits"] == len(CASES)
    assert summary["batch_size"] == 1 and summary["sequential"] is False
    assert len(summary["update_norms"]) == len(CASES) and min(summary["update_norms"]) > 0
    assert summary["efficacy_score"] == 100  # fine-tuning on the prompt itself
    records = load_records(tmp_path, CASES)
    assert [r["case_id"] for r in records] == [c.case_id for c in CASES]
    assert all(len(r["generations"]) == 2 and r["fluency"] is not None for r in records)
    assert records[0]["consistency"] is not None and records[2]["consistency"] is None
    assert json.loads((tmp_path / "run.json").read_text())["method"]["method"] == "ft"
    with pytest.raises(ValueError, match="holds results of another run"):
        evaluate(tiny_gpt2, CASES, "none", tmp_path, **FAST)


def test_interrupted_run_resumes_without_loss_or_repeats(tiny_gpt2, tmp_path, monkeypatch):
    options = dict(method_options={"layer": 1, "steps": 3}, **FAST)
    reference = evaluate(tiny_gpt2, CASES, "ft", tmp_path / "whole", **options)

    real, calls = evaluate_case, []

    def dies_after_two(model, case, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(case.case_id)
        return real(model, case, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_case", dies_after_two)
    before = snapshot(tiny_gpt2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_gpt2, CASES, "ft", tmp_path / "cut", **options)
    assert_same(tiny_gpt2, before)
    assert sorted(p.name for p in (tmp_path / "cut" / "cases").iterdir()) == ["0.json", "1.json"]

    def counts(model, case, *args, **kwargs):
        calls.append(case.case_id)
        return real(model, case, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_case", counts)
    resumed = evaluate(tiny_gpt2, CASES, "ft", tmp_path / "cut", **options)
    assert calls == [0, 1, 2, 3]  # every case run exactly once over the two runs
    assert resumed == reference
    assert without_times(load_records(tmp_path / "cut")) == without_times(
        load_records(tmp_path / "whole"))
    assert evaluate(tiny_gpt2, CASES, "ft", tmp_path / "cut", **options) == reference
    assert calls == [0, 1, 2, 3]  # a finished run redoes nothing


def test_runner_errors(tiny_gpt2, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'mend'"):
        evaluate(tiny_gpt2, CASES, "mend", tmp_path, **FAST)
    with pytest.raises(ValueError, match="dataset is empty"):
        evaluate(tiny_gpt2, [], "none", tmp_path, **FAST)
    with pytest.raises(TypeError, match="CounterFactCase or all ZsreCase"):
        evaluate(tiny_gpt2, [{"case_id": 1}], "none", tmp_path, **FAST)


def test_rome_and_none_through_the_harness(tiny_llama, tmp_path):
    corpus = ["The Eiffel Tower is located in the city of Paris, France.",
              "The Colosseum is in Rome. Miles Davis plays the trumpet."] * 30
    stats = key_statistics(tiny_llama, 2, corpus, samples=12, token_length=16,
                           cache_dir=tmp_path, progress=False)
    before = snapshot(tiny_llama)
    options = {"layer": 2, "stats": stats, "v_steps": 3, "n_prefixes": 2,
               "prefix_lengths": (3,)}
    edited = evaluate(tiny_llama, CASES[:2], "rome", tmp_path / "rome", method_options=options,
                      **FAST)
    plain = evaluate(tiny_llama, CASES[:2], "none", tmp_path / "none", **FAST)
    assert_same(tiny_llama, before)
    assert plain["efficacy_magnitude"] < edited["efficacy_magnitude"]


def test_zsre_through_the_harness(tiny_gpt2, tmp_path):
    cases = load_zsre([{"subject": "The Eiffel Tower", "src": "The Eiffel Tower is in",
                        "rephrase": "The Eiffel Tower is located in", "alt": "Rome",
                        "answers": ["Paris"], "loc": "Miles Davis plays the",
                        "loc_ans": "trumpet", "pred": ""}])
    summary = evaluate(tiny_gpt2, cases, "ft", tmp_path, method_options={"layer": 1, "lr": 1e-2},
                       progress=False)
    assert tuple(summary) == ZSRE_KEYS + RUN_KEYS and summary["n"] == 1
    assert summary["efficacy"] == 100
    assert all(0 <= summary[k] <= 100 for k in ZSRE_KEYS[1:])


def test_cli(tiny_gpt2, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "load_model", lambda name, backend=None: tiny_gpt2)
    data = counterfact_file(tmp_path)
    out = tmp_path / "out"
    args = ["evaluate", "--dataset", str(data), "--format", "counterfact", "--method", "none",
            "--limit", "3", "--out", str(out), "--max-new-tokens", "4"]
    assert main(args) == 0
    assert set(json.loads((out / "summary.json").read_text())) == {*COUNTERFACT_KEYS, *RUN_KEYS}
    assert len(list((out / "cases").iterdir())) == 3
    assert "efficacy_score" in capsys.readouterr().out

    records = [c.to_dict() for c in CASES]
    records[2]["requested_rewrite"]["target_new"]["str"] = ""
    data.write_text(json.dumps(records))
    assert main(args) == 2
    assert "case 2: requested_rewrite.target_new.str must be a non-empty string" in \
        capsys.readouterr().err
    for flag, value in (("--format", "mend"), ("--method", "mend")):
        bad = list(args)
        bad[bad.index(flag) + 1] = value
        with pytest.raises(SystemExit):
            main(bad)
        assert "invalid choice: 'mend'" in capsys.readouterr().err


@pytest.mark.embedded
def test_smollm_fine_tuning_edits_and_reverts(smollm, known_facts):
    torch.set_num_threads(1)
    case = build_counterfact(known_facts, n=1, seed=0)[0]
    prompts = [case.rewrite_prompt]
    targets = [case.request.target_new, case.request.target_true]
    before = snapshot(smollm)
    old = target_log_probs(smollm, prompts, targets)[0]
    change = make_method("ft", smollm).apply(smollm, case.request)
    new = target_log_probs(smollm, prompts, targets)[0]
    change.revert()
    assert new[0] > new[1] and old[0] < new[0]
    assert_same(smollm, before)
    assert np.isfinite(np.array(change.info["losses"])).all()
