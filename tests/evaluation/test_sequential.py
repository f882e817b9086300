"""Batched and sequential evaluation runs: summary keys, checkpoints, resume, reverts, errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CASES, FAST, counterfact_file

from lens_rome.cli import main
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.memit import MemitHyperParams
from lens_rome.editing.registry import NoEdit, apply_batch, make_method
from lens_rome.editing.statistics import key_statistics
from lens_rome.evaluation import runner
from lens_rome.evaluation.runner import (
    COUNTERFACT_KEYS,
    RUN_KEYS,
    SEQUENTIAL_KEYS,
    checkpoint_samples,
    evaluate,
    load_records,
    measure_cases,
    summarize,
)
from lens_rome.model import loading

TINY = dict(v_steps=2, n_prefixes=2, prefix_lengths=(3,))
CORPUS = ["The Eiffel Tower is located in the city of Paris, France.",
          "The Colosseum is in Rome. Miles Davis plays the trumpet."] * 30


@pytest.fixture
def stats(tiny_llama, tmp_path):
    return {l: key_statistics(tiny_llama, l, CORPUS, samples=12, token_length=16,
                              cache_dir=tmp_path / "stats", progress=False) for l in (1, 2)}


def rome_options(stats):
    return {"hparams": RomeHyperParams(layer=2, **TINY), "stats": stats[2]}


def memit_options(stats, **changes):
    return {"hparams": MemitHyperParams(layers=(1, 2), value=RomeHyperParams(layer=2, **TINY),
                                        **changes), "stats": stats}


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p), name


def test_sequential_run_summary_checkpoints_and_revert(tiny_llama, stats, tmp_path):
    before = snapshot(tiny_llama)
    summary = evaluate(tiny_llama, CASES, "rome", tmp_path / "rome", sequential=True,
                       checkpoints=[1, 2], method_options=rome_options(stats), **FAST)
    assert_same(tiny_llama, before)  # every edit reverted at the end
    assert tuple(summary) == COUNTERFACT_KEYS + RUN_KEYS + SEQUENTIAL_KEYS
    assert json.loads((tmp_path / "rome" / "summary.json").read_text()) == summary
    assert summary["n_edits"] == 4 and summary["batch_size"] == 1 and summary["sequential"]
    assert len(summary["update_norms"]) == 4 and min(summary["update_norms"]) > 0
    assert [p["n_edits"] for p in summary["checkpoints"]] == [1, 2, 4]
    assert [p["edited"]["n"] for p in summary["checkpoints"]] == [1, 2, 4]
    # the unedited model's measures, taken before the first edit, over the same cases
    unedited = summarize(measure_cases(tiny_llama, CASES, max_new_tokens=6,
                                       consistency=FAST["consistency"]))
    assert summary["original"] == unedited
    assert summary["checkpoints"][-1]["original"] == unedited
    assert summary["efficacy_magnitude"] > unedited["efficacy_magnitude"]
    records = load_records(tmp_path / "rome", CASES)
    assert [r["n_edits"] for r in records] == [4] * 4 and [r["batch"] for r in records] == \
        [0, 1, 2, 3]


def test_sequential_run_resumes_from_saved_edits(tiny_llama, stats, tmp_path, monkeypatch):
    options = dict(sequential=True, batch_size=2, checkpoints=[2],
                   method_options=memit_options(stats, null_space=True), **FAST)
    whole = evaluate(tiny_llama, CASES, "alphaedit", tmp_path / "whole", **options)
    assert len(whole["update_norms"]) == 2 and whole["batch_size"] == 2

    real, calls = apply_batch, []

    def dies_at_the_second_batch(method, model, requests):
        calls.append([r.subject for r in requests])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(method, model, requests)

    monkeypatch.setattr(runner, "apply_batch", dies_at_the_second_batch)
    before = snapshot(tiny_llama)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_llama, CASES, "alphaedit", tmp_path / "cut", **options)
    assert_same(tiny_llama, before)
    assert (tmp_path / "cut" / "checkpoints" / "000002.json").exists()
    calls.clear()
    monkeypatch.setattr(runner, "apply_batch", lambda *a: calls.append(a) or real(*a))
    resumed = evaluate(tiny_llama, CASES, "alphaedit", tmp_path / "cut", **options)
    assert len(calls) == 1  # the first batch was loaded from its file, not edited again
    assert resumed == whole  # the same bits: re-applying a saved edit is exact
    assert_same(tiny_llama, before)
    calls.clear()
    assert evaluate(tiny_llama, CASES, "alphaedit", tmp_path / "cut", **options) == whole
    assert calls == []  # a finished run redoes nothing


def test_batches_without_sequence(tiny_llama, stats, tmp_path):
    before = snapshot(tiny_llama)
    summary = evaluate(tiny_llama, CASES, "memit", tmp_path, batch_size=3,
                       method_options=memit_options(stats), **FAST)
    assert_same(tiny_llama, before)
    assert summary["n_edits"] == 4 and summary["sequential"] is False
    assert len(summary["update_norms"]) == 2  # batches of 3 and 1
    records = load_records(tmp_path, CASES)
    assert [r["batch"] for r in records] == [0, 0, 0, 1]
    assert json.loads((tmp_path / "run.json").read_text())["method"]["method"] == "memit"


def test_sequential_fine_tuning_runs_but_cannot_resume(tiny_gpt2, tmp_path):
    options = dict(sequential=True, method_options={"layer": 1, "steps": 2}, **FAST)
    before = snapshot(tiny_gpt2)
    summary = evaluate(tiny_gpt2, CASES[:2], "ft", tmp_path, **options)
    assert_same(tiny_gpt2, before)
    assert summary["n_edits"] == 2
    (tmp_path / "checkpoints" / "000002.json").unlink()
    with pytest.raises(ValueError, match="cannot be saved, so it cannot resume"):
        evaluate(tiny_gpt2, CASES[:2], "ft", tmp_path, **options)


def test_run_errors(tiny_gpt2, tmp_path):
    with pytest.raises(ValueError, match="checkpoint 3 is not a whole number of batches of 2"):
        evaluate(tiny_gpt2, CASES, "none", tmp_path, sequential=True, batch_size=2,
                 checkpoints=[3], **FAST)
    with pytest.raises(ValueError, match="checkpoints are for sequential runs"):
        evaluate(tiny_gpt2, CASES, "none", tmp_path, checkpoints=[1], **FAST)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate(tiny_gpt2, CASES, "none", tmp_path, batch_size=0, **FAST)
    with pytest.raises(ValueError, match="batch of edit requests is empty"):
        apply_batch(NoEdit(), tiny_gpt2, [])
    with pytest.raises(ValueError, match="'r-rome' is ROME with update_key='average'"):
        make_method("r-rome", tiny_gpt2, update_key="bare")
    assert make_method("r-rome", tiny_gpt2, layer=1).hparams.update_key == "average"
    assert make_method("alphaedit", tiny_gpt2, layers=(1, 2)).hparams.null_space


def test_cli_sequential(tiny_gpt2, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "load_model", lambda name, backend=None: tiny_gpt2)
    data = counterfact_file(tmp_path)
    out = tmp_path / "out"
    args = ["evaluate", "--dataset", str(data), "--format", "counterfact", "--method", "none",
            "--out", str(out), "--max-new-tokens", "3", "--batch-size", "2", "--sequential",
            "--checkpoints", "2", "--checkpoint-sample", "3"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_edits"] == 4 and summary["batch_size"] == 2 and summary["sequential"]
    assert [(p["n_edits"], p["measured"]) for p in summary["checkpoints"]] == [(2, 2), (4, 3)]
    printed = capsys.readouterr().out
    assert "update norm per batch" in printed and "unedited perplexity" in printed
    assert "right after each edit: efficacy" in printed and "NS+" in printed
    for bad, message in ((["--layers", "1,2"], "--layers is for memit and alphaedit"),
                         (["--method", "memit", "--layer", "1"], "give --layers, not --layer")):
        argv = list(args)
        for flag, value in zip(bad[::2], bad[1::2]):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert main([a for a in args if a != "--sequential"]) == 2
    assert "--checkpoints needs --sequential" in capsys.readouterr().err
    assert main(args[:args.index("--sequential")] + ["--checkpoint-sample", "3"]) == 2
    assert "--checkpoint-sample needs --sequential" in capsys.readouterr().err


def test_the_command_line_defaults_are_the_librarys():
    from lens_rome.cli import evaluate as command
    from lens_rome.evaluation import collapse, counterfact

    assert command.DEFAULT_ANSWER_TOKENS == counterfact.DEFAULT_ANSWER_TOKENS
    assert command.DEFAULT_PERPLEXITY_CHUNKS == collapse.DEFAULT_CHUNKS


def test_checkpoint_samples_are_bounded_and_kept_by_longer_runs():
    samples = checkpoint_samples(200, [1, 10, 50, 200], 20, seed=3)
    assert samples[1] == [0] and len(samples[10]) == 10 and len(samples[50]) == 20
    assert all(i < 50 for i in samples[50]) and len(set(samples[200])) == 20
    # the same checkpoints of a run over fewer cases measure the same cases
    assert checkpoint_samples(50, [1, 10, 50], 20, seed=3) == \
        {n: samples[n] for n in (1, 10, 50)}
    assert checkpoint_samples(200, [50], 20, seed=4)[50] != samples[50]
    assert checkpoint_samples(5, [2, 5], None) == {2: [0, 1], 5: [0, 1, 2, 3, 4]}


def test_sampled_run_extends_to_more_cases(tiny_llama, stats, tmp_path, monkeypatch):
    options = dict(sequential=True, checkpoint_sample=2, method_options=rome_options(stats),
                   **FAST)
    whole = evaluate(tiny_llama, CASES, "rome", tmp_path / "whole", checkpoints=[1, 2, 4],
                     **options)
    assert [(p["n_edits"], p["measured"], p["edited"]["n"], p["original"]["n"])
            for p in whole["checkpoints"]] == [(1, 1, 1, 1), (2, 2, 2, 2), (4, 2, 2, 2)]
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["checkpoint_sample"] == 2
    short = evaluate(tiny_llama, CASES[:2], "rome", tmp_path / "grown", checkpoints=[1, 2],
                     **options)
    assert short["checkpoints"] == whole["checkpoints"][:2]
    real, calls = apply_batch, []
    monkeypatch.setattr(runner, "apply_batch", lambda *a: calls.append(a) or real(*a))
    before = snapshot(tiny_llama)
    grown = evaluate(tiny_llama, CASES, "rome", tmp_path / "grown", checkpoints=[1, 2, 4],
                     **options)
    assert len(calls) == 2  # the first two edits were loaded from their files
    assert grown == whole
    assert_same(tiny_llama, before)
    with pytest.raises(ValueError, match="holds results of another run"):  # not a shorter one
        evaluate(tiny_llama, CASES, "rome", tmp_path / "grown", checkpoints=[2, 4], **options)
    with pytest.raises(ValueError, match="checkpoint_sample is for sequential runs"):
        evaluate(tiny_llama, CASES, "rome", tmp_path / "x", checkpoint_sample=2,
                 method_options=rome_options(stats), **FAST)
    with pytest.raises(ValueError, match="checkpoint_sample must be an integer >= 1"):
        evaluate(tiny_llama, CASES, "rome", tmp_path / "x", sequential=True,
                 checkpoint_sample=0, method_options=rome_options(stats), **FAST)
