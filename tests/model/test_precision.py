"""Precision follows the hardware: bfloat16 only where it is fast, reported wherever it ran."""

from __future__ import annotations

import warnings

import pytest
import torch

from lens_rome.editing import rome
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.model import precision
from lens_rome.model.precision import (
    _FAST,
    _PROBES,
    bf16_is_fast,
    probe_report,
    resolve_bf16,
)
from lens_rome.tracing.engine import trace

PROMPT, SUBJECT = "The Space Needle is in downtown", "The Space Needle"


@pytest.fixture
def bf16_slow(monkeypatch):
    """Pretend this CPU has no bf16 units (whatever it really has)."""
    monkeypatch.setitem(_FAST, "cpu", False)
    monkeypatch.setitem(_PROBES, "cpu", {"bf16_fast": False, "rule": "pretended"})
    monkeypatch.setattr(precision, "_WARNED", set())


@pytest.fixture
def bf16_fast(monkeypatch):
    monkeypatch.setitem(_FAST, "cpu", True)
    monkeypatch.setitem(_PROBES, "cpu", {"bf16_fast": True, "rule": "pretended"})


def test_the_probe_measures_once_and_says_why():
    first = probe_report()
    assert isinstance(first["bf16_fast"], bool) and first["rule"]
    assert "cpu_capability" in first and "bf16_gflops_128" in first
    assert bf16_is_fast() is first["bf16_fast"]
    assert probe_report() == first  # cached for the process


def test_auto_follows_the_probe(bf16_slow):
    assert resolve_bf16(None) is False
    assert resolve_bf16("auto") is False
    assert resolve_bf16(False) is False


def test_auto_takes_bf16_where_it_is_fast(bf16_fast):
    assert resolve_bf16(None) is True


def test_explicit_bf16_on_a_slow_cpu_runs_but_warns_once(bf16_slow):
    with pytest.warns(RuntimeWarning, match="no fast bfloat16 .*pretended.*far slower"):
        assert resolve_bf16(True, what="a test") is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_bf16(True) is True  # no second warning


def test_bad_setting_is_named():
    with pytest.raises(ValueError, match="bf16 must be True, False, None or 'auto', got 'yes'"):
        resolve_bf16("yes")


def test_trace_reports_the_precision_that_ran(tiny_llama, bf16_fast):
    assert trace(tiny_llama, PROMPT, SUBJECT, samples=2).meta["precision"] == "float32"
    auto = trace(tiny_llama, PROMPT, SUBJECT, samples=2, bf16="auto")
    assert auto.meta["precision"] == "bfloat16" and auto.meta["bf16"] is True


def test_rome_defaults_to_float32_even_where_bf16_is_fast(tiny_llama, bf16_fast):
    hp = RomeHyperParams.for_model("smollm2-135m")
    assert hp.bf16 is False  # the paper's float32 loop unless the user asks
    request = {"prompt": "{} is in downtown", "subject": "The Space Needle",
               "target_new": " Paris"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 chosen silently
        change = rome.edit(tiny_llama, request, layer=2, v_steps=2, n_prefixes=2,
                           stats=torch.eye(tiny_llama.cfg.d_mlp, dtype=torch.float64))
    change.revert()
    assert change.info["precision"] == "float32"
    assert change.info["blocks"] == "lens_rome.model.fast_blocks"


@pytest.mark.parametrize("fast", [False, True])
def test_the_precision_command_prints_the_probe_and_each_entry_point(fast, monkeypatch, capsys):
    from lens_rome.cli import main

    monkeypatch.setitem(_FAST, "cpu", fast)
    monkeypatch.setitem(_PROBES, "cpu", {"bf16_fast": fast, "rule": "pretended",
                                                   "cpu": "Some CPU", "cpu_capability": "AVX2"})
    assert main(["precision"]) == 0
    out = capsys.readouterr().out
    assert "Some CPU" in out and f"bfloat16 is {'fast' if fast else 'slow'} here: pretended" in out
    lines = {line.split(None, 1)[1]: line.split()[0] for line in out.splitlines()[2:]}
    assert lines["trace() (bf16=False: exact float32)"] == "float32"
    auto = "bfloat16" if fast else "float32"
    assert lines["trace(bf16='auto')"] == auto
    assert lines["rome.edit, lens-rome edit/evaluate: ROME's v* loop (bf16=False: float32)"] == "float32"
    assert lines["rome.edit(..., bf16=None): ROME's v* loop asks the probe"] == auto
