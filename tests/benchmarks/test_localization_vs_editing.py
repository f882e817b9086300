"""The localization-vs-editing benchmark (Hase et al. 2023): it traces and edits every case
once, resumes without redoing work, refuses another run's folder, leaves the model as it
was, and its correlations and R^2 are the textbook ones."""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import load_benchmark

from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.statistics import key_statistics
from lens_rome.errors import SavedFileError

CORPUS = [
    "The Eiffel Tower is located in the city of Paris, France.",
    "The Space Needle is in downtown Seattle, and Miles Davis plays the trumpet.",
    "The Colosseum is in Rome. The Louvre is in Paris.",
] * 40
LAYERS = [1, 3]
HPARAMS = RomeHyperParams(layer=1, v_steps=3, n_prefixes=2, prefix_lengths=(3,))
TRACE = dict(samples=2, window=3)


def case(known_id, subject, new, true):
    """A case as ``rome_edits.build_cases`` makes them, in the tiny tokenizer's words."""
    return {"known_id": known_id,
            "request": {"prompt": "{} is located in the city of", "subject": subject,
                        "target_new": " " + new, "target_true": " " + true},
            "paraphrases": [f"{subject} is in the city of"],
            "neighbours": ["The Colosseum is in the city of", "The Louvre is in"]}


CASES = [case(0, "The Eiffel Tower", "Rome", "Paris"),
         case(1, "The Space Needle", "Paris", "Seattle"),
         case(2, "Miles Davis", "Seattle", "Rome")]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("localization_vs_editing")


@pytest.fixture(scope="module")
def stats(tiny_gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stats")
    return {layer: key_statistics(tiny_gpt2, layer, CORPUS, samples=20, token_length=16,
                                  cache_dir=folder, progress=False) for layer in LAYERS}


def measure(bench, model, stats, out, cases=CASES, layers=LAYERS, **changes):
    options = {"hparams": HPARAMS, "stats": stats, "progress": False, **TRACE, **changes}
    return bench.run(model, cases, layers, out, **options)


@pytest.fixture(scope="module")
def finished(bench, tiny_gpt2, stats, tmp_path_factory):
    """A finished run's folder, its records, and the model's weights before it."""
    torch.set_num_threads(1)
    before = {name: p.detach().clone() for name, p in tiny_gpt2.named_parameters()}
    out = tmp_path_factory.mktemp("run")
    records = measure(bench, tiny_gpt2, stats, out)
    return out, records, before


def test_every_case_is_traced_once_and_edited_at_every_layer(finished, tiny_gpt2):
    out, records, before = finished
    traces = [r for r in records if r["kind"] == "trace"]
    edits = [r for r in records if r["kind"] == "edit"]
    assert sorted(r["known_id"] for r in traces) == [0, 1, 2]
    assert sorted((r["known_id"], r["layer"]) for r in edits) == \
        [(i, layer) for i in range(3) for layer in LAYERS]
    assert all(len(r["effect"]) == tiny_gpt2.cfg.n_layers for r in traces)
    for r in edits:
        assert r["rewrite"] == pytest.approx((r["p_new_post"] - r["p_new_pre"])
                                             / (1 - r["p_new_pre"]))
        assert {"efficacy", "paraphrase", "neighbourhood", "seconds"} <= set(r)
    assert [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()] \
        == records


def test_the_edits_change_the_model_and_every_one_is_reverted(finished, tiny_gpt2):
    _, records, before = finished
    assert any(r["p_new_post"] > r["p_new_pre"] for r in records if r["kind"] == "edit")
    for name, p in tiny_gpt2.named_parameters():
        assert torch.equal(before[name], p), name


def test_a_rerun_resumes_without_tracing_or_editing_again(bench, finished, tiny_gpt2, stats,
                                                         tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    store = out / "records.jsonl"
    lines = store.read_text().splitlines(keepends=True)
    store.write_text("".join(lines[:-1]))  # the run was stopped before its last edit
    calls = []
    for name in ("trace_record", "edit_record"):
        real = getattr(bench, name)
        monkeypatch.setattr(bench, name, lambda *a, real=real, name=name:
                            calls.append(name) or real(*a))

    records = measure(bench, tiny_gpt2, stats, out)
    assert calls == ["edit_record"]
    assert len(records) == len(lines)
    assert len(store.read_text().splitlines()) == len(lines)
    assert (records[-1]["known_id"], records[-1]["layer"]) == (2, LAYERS[-1])

    calls.clear()
    again = store.read_text()
    assert measure(bench, tiny_gpt2, stats, out) == records
    assert calls == [] and store.read_text() == again


@pytest.mark.parametrize(("changes", "named"), [
    ({"samples": 3}, "samples"), ({"window": 5}, "window"), ({"layers": [1, 2]}, "layers"),
    ({"hparams": HPARAMS.replace(v_steps=4)}, "hparams"),
    ({"settings": {"seed": 1}}, "seed"),
])
def test_a_folder_of_another_run_is_refused(bench, finished, tiny_gpt2, stats, tmp_path,
                                            changes, named):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    kept = (out / "records.jsonl").read_text()
    with pytest.raises(SavedFileError, match=rf"other settings \({named}.*choose another --out"):
        measure(bench, tiny_gpt2, stats, out, **changes)
    assert (out / "records.jsonl").read_text() == kept


def test_a_folder_of_other_cases_with_the_same_ids_is_refused(bench, finished, tiny_gpt2,
                                                              stats, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    other = [case(0, "The Eiffel Tower", "Seattle", "Paris")]
    with pytest.raises(SavedFileError, match="case 0.*choose another --out"):
        measure(bench, tiny_gpt2, stats, out, cases=other)


def test_the_trace_adds_to_the_layer_never_subtracts(bench, finished):
    summary = bench.report(finished[1])
    assert summary["cases"] == 3 and summary["layers"] == LAYERS
    assert len(summary["pairs"]) == 6
    assert summary["r2_layer"] <= summary["r2_layer_trace"] + 1e-12
    assert -1 <= summary["pearson"] <= 1 and -1 <= summary["spearman"] <= 1


def made_up_records(rewrite_of, n_cases=5, layers=(0, 2, 4), n_layers=5, seed=0):
    """Trace rows whose every layer differs, and edits whose rewrite score is
    ``rewrite_of(layer, effect at that layer, noise)``."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_cases):
        effect = rng.uniform(0, 0.5, n_layers).tolist()
        records.append({"kind": "trace", "known_id": i, "effect": effect, "seconds": 2.0,
                        "high_score": 0.1 * (i + 1)})
        for layer in layers:
            records.append({
                "kind": "edit", "known_id": i, "layer": layer, "seconds": 10.0,
                "rewrite": rewrite_of(layer, effect[layer], rng.normal(0, 0.05)),
                "efficacy": float(i % 2), "paraphrase": 0.5, "neighbourhood": 1.0})
    return records


def by_hand(records):
    """Pearson, Spearman (no ties) and the two R^2, written out: per-layer means for the
    layer alone; the within-layer slope of the rewrite score on the effect for both
    (Frisch-Waugh-Lovell)."""
    effects = {r["known_id"]: r["effect"] for r in records if r["kind"] == "trace"}
    edits = [r for r in records if r["kind"] == "edit"]
    layer = np.array([r["layer"] for r in edits])
    x = np.array([effects[r["known_id"]][r["layer"]] for r in edits])
    y = np.array([r["rewrite"] for r in edits])
    within_x, within_y = x.copy(), y.copy()
    for l in set(layer.tolist()):
        within_x[layer == l] -= x[layer == l].mean()
        within_y[layer == l] -= y[layer == l].mean()
    total = ((y - y.mean()) ** 2).sum()
    slope = (within_x @ within_y) / (within_x @ within_x)
    return {"pearson": np.corrcoef(x, y)[0, 1],
            "spearman": np.corrcoef(x.argsort().argsort(), y.argsort().argsort())[0, 1],
            "r2_layer": 1 - (within_y @ within_y) / total,
            "r2_layer_trace": 1 - ((within_y - slope * within_x) ** 2).sum() / total}


@pytest.mark.parametrize("rewrite_of", [
    lambda layer, effect, noise: 0.2 * layer + 0.8 * effect + noise,
    lambda layer, effect, noise: 0.9 - 0.1 * layer + noise,
    lambda layer, effect, noise: effect ** 2 + noise,
], ids=["layer-and-trace", "layer-only", "trace-only"])
def test_correlations_and_r_squared_are_the_textbook_ones(bench, rewrite_of):
    records = made_up_records(rewrite_of)
    summary = bench.report(records)
    expected = by_hand(records)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, abs=1e-10), key
    assert summary["r2_layer"] <= summary["r2_layer_trace"]
    edits = [r for r in records if r["kind"] == "edit"]
    for layer, row in summary["per_layer"].items():
        mine = [r for r in edits if r["layer"] == layer]
        assert row["rewrite"] == pytest.approx(np.mean([r["rewrite"] for r in mine]))
        assert row["efficacy"] == pytest.approx(np.mean([r["efficacy"] for r in mine]))
        effects = [next(t["effect"][layer] for t in records if t["kind"] == "trace"
                        and t["known_id"] == r["known_id"]) for r in mine]
        assert row["effect"] == pytest.approx(np.mean(effects))
        rewrites = [r["rewrite"] for r in mine]
        assert row["spearman"] == pytest.approx(  # no ties: ranks by argsort
            np.corrcoef(np.argsort(np.argsort(effects)), np.argsort(np.argsort(rewrites)))[0, 1])
    assert summary["clean_probability"] == pytest.approx(
        {"min": 0.1, "median": 0.3, "max": 0.5})


def test_spearman_averages_the_ranks_of_ties(bench):
    stats = pytest.importorskip("scipy.stats")
    x = np.array([0.1, 0.3, 0.3, 0.2, 0.3, 0.0])
    y = np.array([1.0, 2.0, 2.0, 0.5, 3.0, 3.0])
    assert bench.pearson(bench.ranks(x), bench.ranks(y)) == \
        pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_the_report_prints_a_table_and_draws_the_figure(bench, finished, tmp_path,
                                                        monkeypatch, capsys):
    figure = tmp_path / "figure.png"
    monkeypatch.setattr(sys, "argv", ["localization_vs_editing.py", "--report", "--out",
                                      str(finished[0]), "--plot", str(figure)])
    bench.main()
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    for part in ("tiny", "3 cases", "edit layers 1,3", "2 noise samples", "window 3",
                 "s per edit", "s per trace"):
        assert part in header
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["1", "3"]
    assert "R^2" in text and figure.stat().st_size > 0
    summary = bench.report(finished[1])
    assert f"{100 * summary['r2_layer']:.1f}%" in text
    assert not math.isnan(summary["edit_seconds"])
