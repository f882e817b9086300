"""``lens-rome trace --method attribution`` / ``--kind head`` and ``trace-dataset --method
attribution``, on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run

from lens_rome.cli import arguments
from lens_rome.tracing.attribution import attribute_many
from lens_rome.tracing.dataset import trace_dataset
from lens_rome.tracing.engine import trace
from lens_rome.tracing.noise_rules import Gaussian
from lens_rome.tracing.result import TraceResult
from lens_rome.tracing.verify import Verification

PROMPT = "The Space Needle is in downtown"
SUBJECT = "The Space Needle"


def args(out, *extra):
    return ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2", "--window", "3",
            "--out", out, *extra]


@pytest.fixture
def tiny_cli(monkeypatch, tiny_gpt2):
    monkeypatch.setattr(arguments, "load", lambda name, backend=None: tiny_gpt2)
    return tiny_gpt2


@pytest.fixture
def no_model(monkeypatch):
    def refuse(name, backend=None):
        raise AssertionError("the command loaded a model before checking its input")

    monkeypatch.setattr(arguments, "load", refuse)


def test_attribution_writes_its_own_files_and_verifies(tiny_cli, tmp_path, capsys):
    status, out, err = run(args(tmp_path, "--method", "attribution", "--kind", "all",
                                "--verify", "2"), capsys)
    assert status == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"attribution_{kind}{suffix}" for kind in ("hidden", "mlp", "attn")
                           for suffix in (".png", ".html", ".json", "_verify.json"))
    estimates = attribute_many(tiny_cli, PROMPT, SUBJECT, samples=2, window=3)
    for estimate in estimates:
        saved = TraceResult.load(tmp_path / f"attribution_{estimate.kind}.json")
        assert saved.method == "attribution" and saved.metric == "logprob"
        torch.testing.assert_close(saved.scores, estimate.scores)
        checked = Verification.load(tmp_path / f"attribution_{estimate.kind}_verify.json")
        assert len(checked.sites) == 2
    assert out.count("[attribution estimate]") == 3
    assert out.count("exact restoration of the estimate's top 2 sites") == 3
    assert "Spearman over these sites" in out
    # again: refused before any work, nothing replaced
    status, _, err = run(args(tmp_path, "--method", "attribution", "--kind", "all"), capsys)
    assert status == 2 and "attribution_hidden" in err and "--overwrite" in err


def test_attribution_of_heads_with_swap_and_logit_difference(tiny_cli, tmp_path, capsys):
    status, out, err = run(args(tmp_path, "--method", "attribution", "--kind", "head",
                                "--swap", "The Eiffel Needle", "--metric", "logit_diff",
                                "--qk-fix"), capsys)
    assert status == 0, err
    result = TraceResult.load(tmp_path / "attribution_head.json")
    assert result.scores.ndim == 3 and result.n_heads == tiny_cli.cfg.n_heads
    assert "SubjectSwap" in result.noise and result.meta["qk_fix"]
    assert "logit diff(" in out and "head" in out and "qk_fix" in out
    assert (tmp_path / "attribution_head.png").read_bytes().startswith(b"\x89PNG")


def test_exact_head_trace_from_the_command_line(tiny_cli, tmp_path, capsys):
    status, out, err = run(args(tmp_path, "--kind", "head"), capsys)
    assert status == 0, err
    assert TraceResult.load(tmp_path / "trace_head.json").scores.ndim == 3
    assert "layer" in out and "head" in out


@pytest.mark.parametrize("extra, message", [
    (["--qk-fix"], "--qk-fix does not apply to --method exact"),
    (["--verify", "2"], "--verify does not apply to --method exact"),
    (["--steps", "4"], "--steps does not apply to --method exact"),
    (["--method", "attribution", "--verify-best", "9"],
     "--verify-best does not apply to --method attribution"),
    (["--method", "hybrid", "--grad-drop"], "--grad-drop does not apply to --method hybrid"),
    (["--method", "hybrid", "--metric", "logit_diff"], "--method attribution only"),
    (["--metric", "logit_diff"], "--method attribution only"),
    (["--method", "attribution", "--sever", "mlp"], "--sever needs exact restorations"),
    (["--method", "attribution", "--bf16"], "--bf16 applies to exact traces"),
    (["--method", "attribution", "--contrast", " Paris"], "--contrast is the second answer"),
])
def test_options_of_the_other_method_are_refused(tmp_path, capsys, no_model, extra, message):
    status, _, err = run(args(tmp_path, *extra), capsys)
    assert status == 2 and err.startswith("error: ") and message in err


def test_hybrid_writes_its_own_files(tiny_cli, tmp_path, capsys):
    status, out, err = run(args(tmp_path, "--method", "hybrid", "--kind", "mlp", "--verify",
                                "1", "--verify-best", "4", "--steps", "3"), capsys)
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"hybrid_mlp.{ext}" for ext in ("html", "json", "png")]
    saved = TraceResult.load(tmp_path / "hybrid_mlp.json")
    expected = trace(tiny_cli, PROMPT, SUBJECT, "mlp", samples=2, window=3, method="hybrid",
                     verify=1, verify_best=4, steps=3)
    assert saved.method == "hybrid" and saved.meta["steps"] == 3
    assert torch.equal(saved.exact_cells, expected.exact_cells)
    torch.testing.assert_close(saved.scores, expected.scores)
    exact = int(saved.exact_cells[saved.subject_range[0]:].sum())
    assert (f"[hybrid: {exact} cells restored exactly (the estimate's best 4 cells, 1 per "
            f"token)") in out


def test_the_command_line_defaults_are_the_librarys():
    from lens_rome.cli import trace as command
    from lens_rome.tracing import attribution, hybrid

    assert command.DEFAULT_STEPS == attribution.DEFAULT_STEPS
    assert (command.DEFAULT_VERIFY, command.DEFAULT_VERIFY_BEST) == (
        hybrid.DEFAULT_VERIFY, hybrid.DEFAULT_VERIFY_BEST)


def test_noise_and_swap_exclude_each_other(tmp_path, capsys, no_model):
    status, _, err = run(args(tmp_path, "--noise", "0.1", "--swap", "The Seattle Tower"), capsys)
    assert status == 2 and "not allowed with argument" in err


FACTS = [
    {"known_id": 3, "subject": "The Eiffel Tower", "attribute": "Paris",
     "prompt": "The Eiffel Tower is located in the city of"},
    {"known_id": 5, "subject": "The Space Needle", "attribute": "Seattle",
     "prompt": "The Space Needle is in downtown"},
]


def test_dataset_attribution_rows_are_the_estimates(tiny_llama, tmp_path):
    result = trace_dataset(tiny_llama, FACTS, tmp_path / "run", samples=2, window=3,
                           only_correct=False, progress=False, severed=False,
                           method="attribution")
    assert result.settings["method"] == "attribution" and result.n_facts == 2
    level = result.settings["noise_level"]
    for fact in FACTS:
        estimates = attribute_many(tiny_llama, fact["prompt"], fact["subject"], samples=2,
                                   window=3, metric="prob", seed=fact["known_id"],
                                   noise=Gaussian(level=level))
        rows = result.frame[result.frame["known_id"] == fact["known_id"]]
        for estimate in estimates:
            got = rows[rows["kind"] == estimate.kind]
            grid = np.full(tuple(estimate.scores.shape), np.nan)
            grid[got["token"], got["layer"]] = got["score"]
            np.testing.assert_allclose(grid, estimate.scores.numpy(), atol=1e-6)
    assert set(result.frame["sever"]) == {"none"}
    # the same folder resumes only with the same method
    with pytest.raises(ValueError, match="method"):
        trace_dataset(tiny_llama, FACTS, tmp_path / "run", samples=2, window=3,
                      only_correct=False, progress=False, severed=False)


def test_dataset_attribution_refuses_the_severed_experiment(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="severed=False"):
        trace_dataset(tiny_llama, FACTS, tmp_path / "run", method="attribution",
                      only_correct=False, progress=False)
    with pytest.raises(ValueError, match="method must be 'exact' or 'attribution'"):
        trace_dataset(tiny_llama, FACTS, tmp_path / "run", method="fast", severed=False,
                      only_correct=False, progress=False)


def test_runs_from_before_the_method_setting_still_resume(tiny_llama, tmp_path):
    out = tmp_path / "run"
    common = dict(samples=2, window=3, only_correct=False, progress=False, severed=False)
    trace_dataset(tiny_llama, FACTS, out, ["hidden"], limit=1, **common)
    run_file = out / "run.json"
    saved = json.loads(run_file.read_text())
    del saved["settings"]["method"]  # as written before this setting existed
    run_file.write_text(json.dumps(saved))
    result = trace_dataset(tiny_llama, FACTS, out, ["hidden"], **common)
    assert result.n_facts == 2 and result.report["traced_this_run"] == 1


def test_dataset_command_with_attribution(monkeypatch, tiny_llama, tmp_path, capsys):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS))
    monkeypatch.setattr(arguments, "load", lambda name, backend=None: tiny_llama)
    status, out, err = run(["trace-dataset", "--facts", facts, "--out", tmp_path / "run",
                            "--all-facts", "--samples", "2", "--window", "3", "--method",
                            "attribution", "--boot", "20"], capsys)
    assert status == 0, err
    assert "method attribution" in out and "+ severed" not in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["method"] == "attribution" and summary["n_facts"] == 2
    assert not (tmp_path / "run" / "figure3_severed.png").exists()
