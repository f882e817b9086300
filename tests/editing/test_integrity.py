"""Nothing poisons the weights or mixes runs: finite inputs, conditioned statistics,
checksummed files, runs tied to their cases.

Written against the parent commit first: every test of a bad input below failed
there (the bad input was accepted and reached the weights or the results).
Errors are caught as :class:`LensRomeError`, which that commit had too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct

import pytest
import torch
from helpers import CASES, FAST as QUICK_EVALUATION

from lens_rome.data.cases import CounterFactCase, load_counterfact
from lens_rome.data.requests import EditRequest
from lens_rome.editing import memit, rome
from lens_rome.editing.finetune import FineTuneParams
from lens_rome.editing.rome import Edit
from lens_rome.editing.statistics import key_statistics
from lens_rome.errors import LensRomeError
from lens_rome.evaluation.runner import evaluate

CORPUS = [
    "The Eiffel Tower is located in the city of Paris, France.",
    "The Space Needle is in downtown Seattle, and Miles Davis plays the trumpet.",
    "The Colosseum is in Rome. The Louvre is in Paris.",
] * 40
REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": " Rome"}
FAST = dict(layer=2, v_steps=3, n_prefixes=2, prefix_lengths=(3,))


@pytest.fixture
def stats(tiny_gpt2, tmp_path):
    return key_statistics(tiny_gpt2, 2, CORPUS, samples=20, token_length=16,
                          cache_dir=tmp_path, progress=False)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p), name


def damage(path, tensor: str, fill: bytes, *, start: int = 0, length: int | None = None):
    """Overwrite bytes of one tensor of a safetensors file in place (its header kept)."""
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    first, last = header[tensor]["data_offsets"]
    first += 8 + size + start
    last = 8 + size + last if length is None else first + length
    data[first:last] = (fill * (last - first))[: last - first]
    path.write_bytes(bytes(data))


def without_checksum(path):
    """Rewrite a safetensors file as lens_rome wrote it before checksums existed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k != "lens_rome_sha256"}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    save_file(tensors, str(path), metadata=metadata)


NAN32 = struct.pack("<f", math.nan)


# ----------------------------------------------------------- 1. hyper-parameters


@pytest.mark.parametrize("bad", [{"kl_weight": math.nan}, {"weight_decay": math.inf},
                                 {"v_lr": math.nan}, {"clamp_norm": math.inf},
                                 {"early_stop_loss": math.nan}])
def test_non_finite_rome_hyper_parameters_are_refused(tiny_gpt2, stats, bad):
    before = snapshot(tiny_gpt2)
    (name,) = bad
    with pytest.raises(LensRomeError, match=f"{name} must be a finite number"):
        rome.edit(tiny_gpt2, REQUEST, stats=stats, **FAST, **bad)
    assert_same(tiny_gpt2, before)


def test_non_finite_memit_and_fine_tuning_settings_are_refused(tiny_gpt2):
    with pytest.raises(LensRomeError, match="mom2_weight"):
        memit.MemitHyperParams(layers=(1, 2), mom2_weight=math.nan)
    with pytest.raises(LensRomeError, match="null_space_l2"):
        memit.MemitHyperParams(layers=(1, 2), null_space=True, null_space_l2=math.inf)
    with pytest.raises(LensRomeError, match="lr must be a finite number"):
        FineTuneParams(layer=2, lr=math.inf)


# ----------------------------------------------------------- 2, 3. statistics


def test_statistics_with_a_nan_are_refused(tiny_gpt2, stats):
    before = snapshot(tiny_gpt2)
    poisoned = stats.second_moment.clone()
    poisoned[3, 5] = math.nan
    with pytest.raises(LensRomeError, match="non-finite"):
        rome.edit(tiny_gpt2, REQUEST, stats=poisoned, **FAST)
    with pytest.raises(LensRomeError, match="non-finite"):
        memit.edit(tiny_gpt2, [REQUEST], layers=[2], stats={2: poisoned}, v_steps=3,
                   n_prefixes=2, prefix_lengths=(3,))
    assert_same(tiny_gpt2, before)


def test_statistics_from_fewer_keys_than_dimensions_are_refused(tiny_gpt2, tmp_path):
    few = key_statistics(tiny_gpt2, 2, CORPUS, samples=2, token_length=16,
                         cache_dir=tmp_path, progress=False)  # 32 keys, d_mlp 128
    assert few.count == 32
    before = snapshot(tiny_gpt2)
    with pytest.raises(LensRomeError, match=r"32 keys, fewer than the 128 .*stats_ridge="):
        rome.edit(tiny_gpt2, REQUEST, stats=few, **FAST)
    # the bare matrix (no count to go by) is refused for its conditioning
    with pytest.raises(LensRomeError, match=r"ill-conditioned .*condition number"):
        rome.edit(tiny_gpt2, REQUEST, stats=few.second_moment, **FAST)
    assert_same(tiny_gpt2, before)
    # the fix the message names: a ridge
    with rome.edit(tiny_gpt2, REQUEST, stats=few, stats_ridge=0.1, **FAST) as change:
        assert math.isfinite(change.update_norm())


def test_few_keys_warn_and_alphaedit_needs_no_conditioning(tiny_gpt2, stats, caplog):
    with caplog.at_level(logging.WARNING), rome.edit(tiny_gpt2, REQUEST, stats=stats, **FAST):
        pass
    assert "320 keys, 2.5 per dimension" in caplog.text
    # a singular C (count unknown) is fine for AlphaEdit: it never solves with C
    singular = stats.second_moment.clone()
    singular[:, 0] = singular[0, :] = 0.0
    with rome.edit(tiny_gpt2, REQUEST, stats=singular, null_space=True, **FAST):
        pass
    with pytest.raises(LensRomeError, match="ill-conditioned"):
        rome.edit(tiny_gpt2, REQUEST, stats=singular, **FAST)


# ----------------------------------------------------------- 4. saved edits


def test_a_damaged_saved_edit_is_refused(tiny_gpt2, stats, tmp_path):
    with rome.edit(tiny_gpt2, REQUEST, stats=stats, **FAST) as change:
        path = change.save(tmp_path / "edit.safetensors")
    damage(path, "right", NAN32)
    before = snapshot(tiny_gpt2)
    with pytest.raises(LensRomeError, match=r"edit\.safetensors.*checksum"):
        Edit.load(path).apply(tiny_gpt2)
    assert_same(tiny_gpt2, before)


def test_an_edit_saved_before_checksums_loads_with_a_warning(tiny_gpt2, stats, tmp_path,
                                                             caplog):
    with rome.edit(tiny_gpt2, REQUEST, stats=stats, **FAST) as change:
        path = change.save(tmp_path / "old.safetensors")
        expected = change.weight_delta()
    without_checksum(path)
    with caplog.at_level(logging.WARNING):
        loaded = Edit.load(path)
    assert "cannot be verified" in caplog.text
    with loaded.apply(tiny_gpt2):
        assert torch.equal(loaded.weight_delta(), expected)
    # and one damaged to NaN is still stopped before it reaches the weights
    damage(path, "right", NAN32)
    before = snapshot(tiny_gpt2)
    with pytest.raises(LensRomeError, match="non-finite"):
        Edit.load(path).apply(tiny_gpt2)
    assert_same(tiny_gpt2, before)


def test_a_damaged_memit_edit_is_refused(tiny_gpt2, stats, tmp_path):
    with memit.edit(tiny_gpt2, [REQUEST], layers=[2], stats={2: stats}, v_steps=3,
                    n_prefixes=2, prefix_lengths=(3,)) as change:
        path = change.save(tmp_path / "memit.safetensors")
    damage(path, "left.2", b"\x00", length=64)
    with pytest.raises(LensRomeError, match="checksum"):
        memit.load_edit(path)


# ----------------------------------------------------------- 5. the statistics cache


def test_a_damaged_statistics_cache_is_recomputed(tiny_gpt2, stats, tmp_path, caplog):
    path = stats.path
    damage(path, "second_moment", b"\x00", start=16384, length=65536)  # 64 KiB zeroed
    with caplog.at_level(logging.WARNING):
        again = key_statistics(tiny_gpt2, 2, CORPUS, samples=20, token_length=16,
                               cache_dir=tmp_path, progress=False)
    assert not again.from_cache
    assert "checksum" in caplog.text and str(path) in caplog.text
    assert torch.equal(again.second_moment, stats.second_moment)
    # rewritten whole: the next read is from the cache, and the same
    third = key_statistics(tiny_gpt2, 2, CORPUS, samples=20, token_length=16,
                           cache_dir=tmp_path, progress=False)
    assert third.from_cache and torch.equal(third.second_moment, stats.second_moment)


def test_a_cache_written_before_checksums_is_used_with_a_warning(tiny_gpt2, stats, tmp_path,
                                                                 caplog):
    without_checksum(stats.path)
    with caplog.at_level(logging.WARNING):
        again = key_statistics(tiny_gpt2, 2, CORPUS, samples=20, token_length=16,
                               cache_dir=tmp_path, progress=False)
    assert again.from_cache and "cannot be verified" in caplog.text


# ----------------------------------------------------------- 6. the new object is the true one


def test_a_request_whose_new_object_is_the_true_one_is_refused(tiny_gpt2, stats):
    record = CASES[0].to_dict()
    record["requested_rewrite"]["target_new"]["str"] = "Paris"  # its target_true
    with pytest.raises(LensRomeError, match="must differ from target_true") as loader:
        load_counterfact([record])
    with pytest.raises(LensRomeError, match="must differ from target_true") as request:
        EditRequest("{} is located in the city of", "The Eiffel Tower", " Paris", " Paris")
    same = "must differ from target_true (the new object is the one the fact already has)"
    assert same in str(loader.value) and same in str(request.value)
    before = snapshot(tiny_gpt2)
    with pytest.raises(LensRomeError, match="must differ from target_true"):
        rome.edit(tiny_gpt2, {**REQUEST, "target_new": " Paris", "target_true": "Paris"},
                  stats=stats, **FAST)
    assert_same(tiny_gpt2, before)


# ----------------------------------------------------------- 7. runs tied to their cases


def test_evaluate_refuses_a_folder_of_another_dataset_with_the_same_ids(tiny_gpt2, tmp_path):
    out = tmp_path / "run"
    evaluate(tiny_gpt2, CASES[:2], "none", out, **QUICK_EVALUATION)
    other = [dataclasses.replace(c, target_new="Seattle" if c.target_true != "Seattle"
                                 else "Rome") for c in CASES[:2]]
    assert [c.case_id for c in other] == [c.case_id for c in CASES[:2]]
    with pytest.raises(LensRomeError, match=r"other contents \(case 0, 1\).*another dataset"):
        evaluate(tiny_gpt2, other, "none", out, **QUICK_EVALUATION)
    # the same cases, and more of them, resume
    summary = evaluate(tiny_gpt2, CASES[:3], "none", out, **QUICK_EVALUATION)
    assert summary["n_edits"] == 3
    run = json.loads((out / "run.json").read_text())
    assert sorted(run["case_hashes"]) == ["0", "1", "2"]


def test_evaluate_refuses_another_model_under_the_same_name(tiny_gpt2, tiny_llama, tmp_path):
    out = tmp_path / "run"
    evaluate(tiny_gpt2, CASES[:1], "none", out, **QUICK_EVALUATION)
    assert tiny_gpt2.cfg.model_name == tiny_llama.cfg.model_name  # both "tiny"
    with pytest.raises(LensRomeError, match="fingerprint"):
        evaluate(tiny_llama, CASES[:1], "none", out, **QUICK_EVALUATION)


def test_a_run_from_before_case_hashes_resumes_with_a_warning(tiny_gpt2, tmp_path, caplog):
    out = tmp_path / "run"
    evaluate(tiny_gpt2, CASES[:2], "none", out, **QUICK_EVALUATION)
    path = out / "run.json"
    old = json.loads(path.read_text())
    del old["case_hashes"], old["fingerprint"]
    path.write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING):
        evaluate(tiny_gpt2, CASES[:2], "none", out, **QUICK_EVALUATION)
    assert "did not record fingerprint" in caplog.text
    assert "cannot be checked against the cases given now" in caplog.text
    assert sorted(json.loads(path.read_text())["case_hashes"]) == ["0", "1"]


# ----------------------------------------------------------- the checks change no number


def test_the_checks_hand_the_statistics_on_untouched(stats):
    """No ridge, no copy, no rounding: the solve sees the very tensor it saw before the
    checks existed (``benchmarks/edit_digest.py`` compares whole edits across commits)."""
    from lens_rome.editing.statistics import check_conditioning  # new with these checks

    matrix = stats.second_moment
    assert check_conditioning(matrix, 2, count=stats.count) is matrix
    assert check_conditioning(matrix, 2, count=stats.count, solved=False) is matrix
