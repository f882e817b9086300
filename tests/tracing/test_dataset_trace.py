"""Dataset-scale tracing: per-fact rows, the store and its resume, the averages, Ray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lens_rome.data.known_facts import answered_correctly, load_known_facts
from lens_rome.tracing import dataset as dataset_trace
from lens_rome.tracing.dataset import (
    CATEGORIES,
    DatasetTrace,
    FactStore,
    TraceSettings,
    token_categories,
    trace_dataset,
    trace_fact,
)
from lens_rome.tracing.engine import trace
from lens_rome.tracing.noise_rules import Gaussian

FACTS = [
    {"known_id": 3, "subject": "The Eiffel Tower", "attribute": "Paris",
     "prompt": "The Eiffel Tower is located in the city of"},
    {"known_id": 5, "subject": "The Space Needle", "attribute": "Seattle",
     "prompt": "The Space Needle is in downtown"},
    {"known_id": 8, "subject": "Miles Davis", "attribute": "trumpet",
     "prompt": "Miles Davis plays the"},
    {"known_id": 9, "subject": "The Colosseum", "attribute": "Rome",
     "prompt": "The Colosseum is in"},
]
FAST = dict(samples=2, window=3, only_correct=False, progress=False)


def test_token_categories_follow_the_paper():
    # prompt of 8 tokens, subject at tokens 1..3 (three tokens)
    assert token_categories(8, 1, 4) == {
        "first subject token": [1], "middle subject tokens": [2], "last subject token": [3],
        "first subsequent token": [4], "further tokens": [5, 6], "last token": [7]}
    # a one-token subject is first and last; no middle; the token after it is the last
    assert token_categories(3, 1, 2) == {
        "first subject token": [1], "last subject token": [1], "last token": [2]}


def test_load_known_facts_names_the_record_and_field(tmp_path):
    assert [f["known_id"] for f in load_known_facts(FACTS)] == [3, 5, 8, 9]
    broken = [dict(FACTS[0]), {k: v for k, v in FACTS[1].items() if k != "prompt"}]
    with pytest.raises(ValueError, match=r"fact 5 of the dataset lacks 'prompt'"):
        load_known_facts(broken)
    with pytest.raises(ValueError, match=r"fact 5: subject 'Seattle' is not in"):
        load_known_facts([{**FACTS[1], "subject": "Seattle"}])
    with pytest.raises(ValueError, match=r"fact 3: known_id appears more than once"):
        load_known_facts([FACTS[0], FACTS[0]])
    with pytest.raises(ValueError, match=r"fact 3 of the dataset: attribute must be a non-empty"):
        load_known_facts([{**FACTS[0], "attribute": " "}])
    with pytest.raises(ValueError, match="holds no records"):
        load_known_facts([])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_known_facts(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_known_facts(bad)


def test_answered_correctly_uses_the_models_top_token(tiny_llama):
    # steer the tiny model towards " Paris" (a hook on the final norm),
    # so the facts whose attribute is "Paris" are answered and the others are not
    paris = tiny_llama.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]

    def towards_paris(normalized, hook):
        normalized[:] = tiny_llama.W_U[:, paris] * 10  # every position: rows are padded
        return normalized

    facts = [{**f, "attribute": "Paris" if f["known_id"] in (3, 8) else "Rome"} for f in FACTS]
    with tiny_llama.hooks(fwd_hooks=[("ln_final.hook_normalized", towards_paris)]):
        kept = answered_correctly(tiny_llama, facts)
    assert [f["known_id"] for f in kept] == [3, 8]
    assert answered_correctly(tiny_llama, [{**f, "attribute": "zzzz"} for f in FACTS]) == []


def test_trace_fact_rows_are_the_traces(tiny_gpt2):
    settings = TraceSettings(model="tiny", samples=3, window=3, noise_level=0.5, seed=7)
    fact = FACTS[0]
    rows = trace_fact(tiny_gpt2, fact, settings)
    for kind in ("hidden", "mlp", "attn"):
        expected = trace(tiny_gpt2, fact["prompt"], fact["subject"], kind, samples=3, window=3,
                         noise=Gaussian(level=0.5), seed=7 + fact["known_id"])
        got = rows[(rows["kind"] == kind) & (rows["sever"] == "none")]
        grid = np.full(tuple(expected.scores.shape), np.nan)
        grid[got["token"], got["layer"]] = got["score"]
        np.testing.assert_array_equal(grid, expected.scores.numpy())
        assert got["low_score"].iloc[0] == expected.low_score
    last = int(rows["subject_end"].iloc[0]) - 1
    for part in ("mlp", "attn"):
        severed = rows[rows["sever"] == part]
        assert set(severed["token"]) == {last} and len(severed) == tiny_gpt2.cfg.n_layers
        expected = trace(tiny_gpt2, fact["prompt"], fact["subject"], "hidden", sever=part,
                         samples=3, noise=Gaussian(level=0.5), seed=7 + fact["known_id"])
        np.testing.assert_allclose(severed.sort_values("layer")["score"],
                                   expected.scores[last].numpy(), atol=1e-6)


def test_stopped_run_resumes_tracing_each_fact_once(tiny_llama, tmp_path, monkeypatch):
    calls = []
    real = trace_fact

    def stopping(model, fact, settings):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run after two facts
        calls.append(fact["known_id"])
        return real(model, fact, settings)

    monkeypatch.setattr(dataset_trace, "trace_fact", stopping)
    with pytest.raises(KeyboardInterrupt):
        trace_dataset(tiny_llama, FACTS, tmp_path / "run", **FAST)
    assert FactStore(tmp_path / "run").done() == set(calls)

    monkeypatch.setattr(dataset_trace, "trace_fact",
                        lambda m, f, s: (calls.append(f["known_id"]), real(m, f, s))[1])
    resumed = trace_dataset(tiny_llama, FACTS, tmp_path / "run", **FAST)
    assert sorted(calls) == [3, 5, 8, 9]  # every fact traced exactly once
    assert resumed.report["traced_this_run"] == 2 and resumed.n_facts == 4

    again = trace_dataset(tiny_llama, FACTS, tmp_path / "run", **FAST)  # nothing left to do
    assert again.report["traced_this_run"] == 0 and sorted(calls) == [3, 5, 8, 9]

    monkeypatch.setattr(dataset_trace, "trace_fact", real)
    fresh = trace_dataset(tiny_llama, FACTS, tmp_path / "fresh", **FAST)
    columns = ["known_id", "kind", "sever", "token", "layer"]
    pd.testing.assert_frame_equal(resumed.frame.sort_values(columns).reset_index(drop=True),
                                  fresh.frame.sort_values(columns).reset_index(drop=True))


def test_a_run_with_other_settings_is_refused(tiny_llama, tmp_path):
    trace_dataset(tiny_llama, FACTS[:1], tmp_path, **FAST)
    with pytest.raises(ValueError, match=r"other settings \(samples"):
        trace_dataset(tiny_llama, FACTS[:1], tmp_path, **{**FAST, "samples": 3})


def test_bad_arguments_are_named(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="unknown kinds"):
        trace_dataset(tiny_llama, FACTS, tmp_path, kinds=["mlps"], **FAST)
    with pytest.raises(ValueError, match="severed experiment needs 'hidden'"):
        trace_dataset(tiny_llama, FACTS, tmp_path, kinds=["mlp"], **FAST)
    with pytest.raises(ValueError, match="limit must be"):
        trace_dataset(tiny_llama, FACTS, tmp_path, limit=0, **FAST)
    wrong = [{**f, "attribute": "zzzz"} for f in FACTS]
    with pytest.raises(ValueError, match="answers none of the 4 facts"):
        trace_dataset(tiny_llama, wrong, tmp_path, samples=2, progress=False)


def test_a_damaged_fact_file_is_named(tiny_llama, tmp_path):
    trace_dataset(tiny_llama, FACTS[:2], tmp_path, **FAST)
    (tmp_path / "facts" / "3.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"3.parquet is unreadable.*delete it"):
        DatasetTrace.load(tmp_path)


def _synthetic(n_facts=4):
    """Facts of 6 tokens, subject 1..3 (3 tokens), 2 layers, known scores."""
    rows = []
    for f in range(n_facts):
        for token in range(6):
            for layer in range(2):
                rows.append({"known_id": f, "kind": "hidden", "sever": "none", "token": token,
                             "layer": layer, "score": 0.1 * f + token + 10 * layer,
                             "low_score": 0.05, "high_score": 0.9, "n_tokens": 6,
                             "subject_start": 1, "subject_end": 4, "answer": " x"})
    return DatasetTrace(pd.DataFrame(rows), {"model": "synthetic"}, {})


def test_averages_by_category_with_bootstrap_intervals():
    result = _synthetic()
    table = result.average("hidden", n_boot=200)
    assert set(table["category"]) == {"first subject token", "middle subject tokens",
                                      "last subject token", "first subsequent token",
                                      "last token"}  # no "further tokens" in 6 tokens
    mean_f = np.mean([0.1 * f for f in range(4)])
    last_subject = table[(table["category"] == "last subject token") & (table["layer"] == 1)]
    assert last_subject["aie"].item() == pytest.approx(mean_f + 3 + 10 - 0.05)
    assert (table["low"] <= table["aie"] + 1e-12).all() and (table["aie"] <= table["high"] + 1e-12).all()
    assert (table["high"] - table["low"]).max() > 0  # facts differ, so the interval has width
    assert result.total_effect() == pytest.approx(
        {"clean": 0.9, "corrupted": 0.05, "total_effect": 0.85, "n_facts": 4})
    assert list(CATEGORIES).index("last token") == 5


def test_figures_are_drawn(tiny_llama, tmp_path):
    result = trace_dataset(tiny_llama, FACTS, tmp_path, **FAST)
    effects, severed = result.plot_effects(n_boot=20), result.plot_severed(n_boot=20)
    assert isinstance(effects, Figure) and len(effects.axes) == 3 * 2 + 3  # + colorbars
    assert isinstance(severed, Figure)
    for figure, name in ((effects, "effects.png"), (severed, "severed.png")):
        figure.savefig(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    table = result.to_frame(n_boot=20)
    assert set(zip(table["kind"], table["sever"])) == {
        ("hidden", "none"), ("mlp", "none"), ("attn", "none"), ("hidden", "mlp"),
        ("hidden", "attn")}


@pytest.mark.xdist_group("ray")  # beside test_ray_cluster.py, whose `ray stop` ends runtimes
def test_ray_workers_on_a_local_loopback_runtime_give_the_same_traces(tiny_llama, tmp_path):
    ray = pytest.importorskip("ray")
    # workers=2 starts a Ray runtime of two CPUs on 127.0.0.1 and shuts it down after
    distributed = trace_dataset(tiny_llama, FACTS, tmp_path / "ray", workers=2, **FAST)
    assert not ray.is_initialized()
    local = trace_dataset(tiny_llama, FACTS, tmp_path / "local", **FAST)
    columns = ["known_id", "kind", "sever", "token", "layer"]
    a = distributed.frame.sort_values(columns).reset_index(drop=True)
    b = local.frame.sort_values(columns).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[columns], b[columns])
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["traced_this_run"] == 4


@pytest.mark.embedded
def test_cli_traces_known_facts_and_writes_figures(known_facts, tmp_path, capsys):
    from lens_rome.cli import main

    out = tmp_path / "run"
    facts = _write(tmp_path, known_facts[:40])
    assert main(["trace-dataset", "--facts", str(facts), "--out", str(out), "--limit", "1",
                 "--samples", "2", "--kinds", "hidden", "--boot", "50"]) == 0
    printed = capsys.readouterr().out
    assert "facts answered correctly" in printed and "1 traced this run" in printed
    for name in ("figure2_effects.png", "figure3_severed.png", "averages.csv", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_facts"] == 1 and summary["settings"]["kinds"] == ["hidden"]


def _write(folder, facts):
    path = folder / "facts.json"
    path.write_text(json.dumps(facts))
    return path


def test_cli_rejects_a_bad_facts_file(tmp_path, capsys):
    from lens_rome.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"known_id": 1, "subject": "x"}]))
    try:  # bad input: exit status 2, whether argparse or the command reports it
        status = main(["trace-dataset", "--facts", str(bad), "--out", str(tmp_path / "o")])
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    assert "fact 1 of " in (err := capsys.readouterr().err) and "lacks 'attribute'" in err
