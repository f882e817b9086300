"""MEMIT and AlphaEdit batch edits, r-ROME, and stacks of edits of mixed methods."""

from __future__ import annotations

import pytest
import torch

from lens_rome.data.requests import EditRequest
from lens_rome.editing import memit, rome
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.memit import (
    MemitEdit,
    MemitHyperParams,
    check_requests,
    critical_layers,
    load_edit,
    request_keys,
)
from lens_rome.editing.null_space import key_gram, projector, update_left
from lens_rome.editing.rome import Edit
from lens_rome.editing.statistics import key_statistics
from lens_rome.errors import InputError
from lens_rome.editing.values import key_and_value
from lens_rome.editing.weights import applied_edits, edited_keys
from lens_rome.evaluation.measures import target_log_probs
from lens_rome.model.adapter import adapter_for

CORPUS = [
    "The Eiffel Tower is located in the city of Paris, France.",
    "The Space Needle is in downtown Seattle, and Miles Davis plays the trumpet.",
    "The Colosseum is in Rome. The Louvre is in Paris.",
] * 40
FAST = dict(v_steps=3, n_prefixes=4, prefix_lengths=(3, 5))
REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
     "target_new": " Rome"},
    {"prompt": "{} is in downtown", "subject": "The Space Needle", "target_new": " Paris"},
    {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": " Colosseum"},
]
LAYERS = (1, 2)


def stats_for(model, layers, cache_dir):
    return {l: key_statistics(model, l, CORPUS, samples=20, token_length=16,
                              cache_dir=cache_dir, progress=False) for l in layers}


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def tiny(request, tmp_path):
    model = request.getfixturevalue(request.param)
    return model, stats_for(model, LAYERS, tmp_path)


def hparams(layers=LAYERS, fast=FAST, **changes):
    return MemitHyperParams(layers=layers, value=RomeHyperParams(layer=layers[-1], **fast),
                            **changes)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p), name


def target_scores(model, requests):
    parsed = [EditRequest.parse(r) for r in requests]
    return torch.stack([target_log_probs(model, [r.text], [r.target_new])[0, 0]
                        for r in parsed])


# --------------------------------------------------------------------------- the update


def test_keys_are_romes_k_star(tiny_llama):
    hp = RomeHyperParams(layer=2, **FAST)
    request = EditRequest.parse(REQUESTS[0])
    kv = key_and_value(adapter_for(tiny_llama), request, hp)
    keys = request_keys(tiny_llama, [request], 2, hp)
    torch.testing.assert_close(keys[0], kv.key, rtol=1e-5, atol=1e-6)


def test_keys_with_text_prefixes_are_romes_k_star(tiny_llama):
    hp = RomeHyperParams(layer=2, v_steps=3, prefixes=("The city was quiet", "I think"))
    request = EditRequest.parse(REQUESTS[0])
    kv = key_and_value(adapter_for(tiny_llama), request, hp)
    assert kv.info["rows"] == 3  # the bare prompt and the two texts
    keys = request_keys(tiny_llama, [request], 2, hp)
    torch.testing.assert_close(keys[0], kv.key, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight", [15000.0, 1e-3])
def test_one_request_one_layer_is_romes_direction(tiny_llama, tmp_path, weight):
    """MEMIT = ROME's rank-one change C^-1 k* delta^T, scaled by (u.k0) / (lambda + u.k*)."""
    model = tiny_llama
    stats = stats_for(model, (2,), tmp_path)
    value = RomeHyperParams(layer=2, **FAST)
    request = EditRequest.parse(REQUESTS[0])
    kv = key_and_value(adapter_for(model), request, value)
    with rome.edited(model, request, hparams=value, stats=stats[2]) as single:
        romes = single.weight_delta().double()
    with memit.edited(model, [request], hparams=MemitHyperParams(
            layers=(2,), mom2_weight=weight, value=value), stats=stats) as batch:
        memits = batch.weight_delta(2).double()
    assert torch.linalg.matrix_rank(memits, rtol=1e-5) == 1
    u = torch.linalg.solve(stats[2].second_moment, kv.key)
    ratio = (u @ kv.bare_key) / (weight + u @ kv.key)
    torch.testing.assert_close(memits, romes * ratio, rtol=1e-4, atol=1e-6 * float(romes.abs().max()))


def test_batch_edit_moves_every_target_and_reverts(tiny):
    model, stats = tiny
    before = snapshot(model)
    old = target_scores(model, REQUESTS)
    with memit.edited(model, REQUESTS, hparams=hparams(fast={**FAST, "v_steps": 10},
                                                       mom2_weight=10.0), stats=stats) as change:
        assert change.layers == LAYERS and len(change.requests) == 3
        new = target_scores(model, REQUESTS)
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        assert changed == {f"blocks.{l}.mlp.W_out" for l in LAYERS}
        for layer in LAYERS:
            torch.testing.assert_close(
                model.blocks[layer].mlp.W_out - before[f"blocks.{layer}.mlp.W_out"],
                change.weight_delta(layer), rtol=1e-4, atol=1e-6)
            assert change.keys_at(layer).shape == (3, model.cfg.d_mlp)
        assert change.info["remaining_residual"] < change.info["target_norm"]
    # random tiny models have strongly correlated keys (cosine 0.5-0.7), so one target can
    # lose a little to the others; together they gain
    assert float((new - old).sum()) > 0.1
    assert_same(model, before)


def test_save_load_apply_is_bit_exact(tiny, tmp_path):
    model, stats = tiny
    before = snapshot(model)
    change = memit.edit(model, REQUESTS[:2], hparams=hparams(), stats=stats)
    edited = {l: model.blocks[l].mlp.W_out.detach().clone() for l in LAYERS}
    path = change.save(tmp_path / "batch.safetensors")
    with pytest.raises(FileExistsError):
        change.save(path)
    change.revert()
    assert_same(model, before)
    loaded = load_edit(path)
    assert isinstance(loaded, MemitEdit) and not loaded.applied
    assert [r.subject for r in loaded.requests] == ["The Eiffel Tower", "The Space Needle"]
    assert loaded.hparams["layers"] == list(LAYERS)
    with loaded:
        loaded.apply(model)
        for layer in LAYERS:
            assert torch.equal(model.blocks[layer].mlp.W_out, edited[layer])
        with pytest.raises(RuntimeError, match="already applied"):
            loaded.apply(model)
    assert_same(model, before)


def test_an_edit_refuses_another_model(tiny_llama, tiny_gpt2, tmp_path):
    stats = stats_for(tiny_llama, LAYERS, tmp_path)
    with memit.edited(tiny_llama, REQUESTS[:1], hparams=hparams(), stats=stats) as change:
        path = change.save(tmp_path / "edit.safetensors")
    before = snapshot(tiny_gpt2)
    with pytest.raises(ValueError, match="made for model 'tiny'.*fingerprint.*refusing"):
        MemitEdit.load(path).apply(tiny_gpt2)
    assert_same(tiny_gpt2, before)
    with pytest.raises(ValueError, match="not a readable lens_rome MEMIT edit"):
        MemitEdit.load(tmp_path / "edit.safetensors").__class__.load(
            Edit(2, torch.ones(128), torch.ones(64), model_name="tiny", fingerprint="x",
                      d_mlp=128, d_model=64).save(tmp_path / "rome.safetensors"))


def test_bad_batches(tiny_llama, tmp_path):
    stats = stats_for(tiny_llama, LAYERS, tmp_path)
    with pytest.raises(ValueError, match="batch of edit requests is empty"):
        memit.edit(tiny_llama, [], hparams=hparams(), stats=stats)
    conflict = [REQUESTS[0], REQUESTS[1], {**REQUESTS[0], "target_new": " Seattle"}]
    with pytest.raises(ValueError, match=r"requests 0 and 2 rewrite the same fact \('The Eiffel "
                                         r"Tower'.*' Rome' and ' Seattle'"):
        memit.edit(tiny_llama, conflict, hparams=hparams(), stats=stats)
    assert len(check_requests([REQUESTS[0], dict(REQUESTS[0])])) == 1  # repeat: once
    with pytest.raises(ValueError, match="layer 6 is out of range: tiny has layers 0..5"):
        memit.edit(tiny_llama, REQUESTS, layers=[4, 6], stats=stats, **FAST)
    with pytest.raises(ValueError, match="increasing and distinct"):
        MemitHyperParams(layers=(2, 1))
    with pytest.raises(ValueError, match="one or more integers"):
        MemitHyperParams(layers=())
    with pytest.raises(ValueError, match="stats has no entry for layer 3"):
        memit.edit(tiny_llama, REQUESTS, layers=[2, 3], stats=stats, **FAST)
    with pytest.raises(TypeError, match="layers=\\[...\\], not layer="):
        MemitHyperParams.for_model(tiny_llama, layer=2)
    with pytest.raises(TypeError, match="unknown hyper-parameters \\['steps'\\]"):
        MemitHyperParams.for_model(tiny_llama, steps=3)
    assert applied_edits(tiny_llama) == []


def test_default_layers_come_from_the_mlp_trace():
    import json
    from pathlib import Path

    figures = Path(__file__).resolve().parents[2] / "docs" / "figures"
    for model in ("smollm2-135m", "gemma-3-270m"):
        trace = json.loads((figures / f"editing_layer_{model}.json").read_text())
        assert critical_layers(trace["aie_last_subject_token"]) == \
            memit.MODEL_DEFAULTS[model]["layers"]
    assert critical_layers([0.1, 0.5, 0.9, 1.0, 0.2]) == (2, 3)
    assert critical_layers([0.1, 0.5, 0.9, 1.0, 0.2], fraction=0.5) == (1, 2, 3)
    assert critical_layers([1.0, 0.2]) == (0,)


def test_hyperparameters():
    hp = MemitHyperParams.for_model("smollm2-135m", v_steps=3, mom2_weight=100.0)
    assert hp.layers == memit.MODEL_DEFAULTS["smollm2-135m"]["layers"]
    assert hp.value.layer == hp.layers[-1] and hp.value.v_steps == 3 and hp.mom2_weight == 100
    assert MemitHyperParams.from_dict(hp.to_dict()) == hp
    assert hp.replace(layers=(1, 2), kl_weight=0.5).value.layer == 2
    assert hp.replace(null_space=True).null_space and not hp.replace(null_space=True).value.null_space
    # the targets follow MEMIT's compute_z: delta against the hidden state, its clamp and contexts
    for value in (hp.value, MemitHyperParams(layers=(1, 2)).value):
        assert (value.norm_reference, value.clamp_norm) == ("hidden", 0.75)
        assert (value.n_prefixes, value.prefix_lengths) == (5, (10,))
    texts = MemitHyperParams.for_model("smollm2-135m", prefixes=["I think"])
    assert texts.value.prefixes == ("I think",)
    assert MemitHyperParams.from_dict(texts.to_dict()) == texts


# --------------------------------------------------------------------------- r-ROME and AlphaEdit


def test_r_rome_maps_the_averaged_key_to_v_star(tiny_llama, tmp_path):
    model = tiny_llama
    stats = stats_for(model, (2,), tmp_path)[2]
    hp = RomeHyperParams(layer=2, update_key="average", **FAST)
    kv = key_and_value(adapter_for(model), EditRequest.parse(REQUESTS[0]), hp)
    weight = model.blocks[2].mlp.W_out.detach().double()
    with rome.edited(model, REQUESTS[0], hparams=hp, stats=stats) as change:
        moved = kv.key @ change.weight_delta().double()
        # W' k* = W k0 + delta: v* for the averaged key, not for the bare prompt's
        torch.testing.assert_close(moved, kv.delta.double() + (kv.bare_key - kv.key) @ weight,
                                   rtol=1e-3, atol=1e-4)
        u = stats.solve(kv.key)
        torch.testing.assert_close(change.left.double(), u / u.norm(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="update_key must be one of"):
        RomeHyperParams(layer=2, update_key="mean")


def test_null_space_solution_by_hand():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    c = basis @ torch.diag(torch.tensor([1e-4, 2e-4, 1.0, 2.0, 3.0, 4.0],
                                        dtype=torch.float64)) @ basis.T
    p = projector(c, 0.1)
    torch.testing.assert_close(p, basis[:, :2] @ basis[:, :2].T)
    keys, earlier = torch.randn(3, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    gram = key_gram([earlier], 6)
    left = update_left(p, keys, gram, 0.5)
    torch.testing.assert_close((p @ (keys.T @ keys + gram) + 0.5 * torch.eye(6)) @ left, p @ keys.T)
    torch.testing.assert_close(p @ left, left)  # the change lies in the null space
    assert float((c @ left).norm()) < 1e-3 * float(left.norm())
    with pytest.raises(ValueError, match="null space is empty"):
        projector(c, 1e-6)


def test_alphaedit_changes_only_the_null_space_and_keeps_earlier_edits(tiny_llama, tmp_path):
    model = tiny_llama
    stats = stats_for(model, LAYERS, tmp_path)
    before = snapshot(model)
    hp = hparams(null_space=True, null_space_l2=1e-3)
    first = memit.edit(model, REQUESTS[:1], hparams=hp, stats=stats)
    second = memit.edit(model, REQUESTS[1:2], hparams=hp, stats=stats)
    for layer in LAYERS:
        p = projector(stats[layer].second_moment, hp.null_space_threshold)
        delta = second.weight_delta(layer).double()
        torch.testing.assert_close(p @ delta, delta, rtol=1e-4, atol=1e-6)
        # the first edit's keys barely see the second edit (AlphaEdit's K_p term)
        kept = first.keys_at(layer).double() @ delta
        assert float(kept.norm()) < 0.05 * float((second.keys_at(layer).double() @ delta).norm())
    second.revert()
    first.revert()
    assert_same(model, before)


def test_rome_with_null_space_option(tiny_llama, tmp_path):
    stats = stats_for(tiny_llama, (2,), tmp_path)[2]
    with rome.edited(tiny_llama, REQUESTS[0], layer=2, stats=stats, null_space=True,
                     **FAST) as change:
        p = projector(stats.second_moment, change.hparams["null_space_threshold"])
        torch.testing.assert_close(p @ change.left.double(), change.left.double(),
                                   rtol=1e-4, atol=1e-6)
        assert change.keys_at(2).shape == (1, tiny_llama.cfg.d_mlp)
        assert edited_keys(tiny_llama, 2)[0] is change.keys


# --------------------------------------------------------------------------- stacks


def test_twenty_stacked_edits_of_mixed_methods_revert_bit_exactly(tiny_llama, tmp_path):
    model = tiny_llama
    stats = stats_for(model, LAYERS, tmp_path)
    quick = dict(v_steps=1, n_prefixes=2, prefix_lengths=(3,))
    before = snapshot(model)
    subjects = ["The Eiffel Tower", "The Space Needle", "Miles Davis", "The Colosseum",
                "The Louvre"]
    targets = [" Rome", " Paris", " Seattle", " trumpet"]
    stack = []
    for i in range(20):
        request = {"prompt": "{} is in", "subject": subjects[i % 5],
                   "target_new": targets[i % 4]}
        kind = i % 4
        if kind == 0:
            stack.append(rome.edit(model, request, layer=2, stats=stats[2], **quick))
        elif kind == 1:
            stack.append(rome.edit(model, request, layer=1, stats=stats[1], update_key="average",
                                   **quick))
        elif kind == 2:
            stack.append(memit.edit(model, [request], hparams=hparams(fast=quick), stats=stats))
        else:
            stack.append(memit.edit(model, [request], hparams=hparams(fast=quick,
                                                                      null_space=True),
                                    stats=stats))
    assert applied_edits(model) == stack
    assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="reverse order"):
        stack[-3].revert()
    for change in reversed(stack):
        change.revert()
    assert_same(model, before)
    assert applied_edits(model) == []


# --------------------------------------------------------------------------- embedded model


@pytest.mark.embedded
def test_smollm_batch_rewrites_two_facts_and_reverts(smollm, tmp_path):
    stats = {l: key_statistics(smollm, l, samples=48, token_length=64, cache_dir=tmp_path,
                               progress=False) for l in (4, 5)}
    requests = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                 "target_new": " Rome", "target_true": " Paris"},
                {"prompt": "{} is located in the continent of", "subject": "Vinson Massif",
                 "target_new": " Europe", "target_true": " Antarctica"}]
    prompts = ["The Eiffel Tower is located in the city of",
               "Vinson Massif is located in the continent of"]
    before = snapshot(smollm)
    hp = MemitHyperParams(layers=(4, 5), mom2_weight=300.0, value=RomeHyperParams(
        layer=5, v_steps=10, n_prefixes=4, prefix_lengths=(5,), early_stop_nll=0.2))
    with memit.edited(smollm, requests, hparams=hp, stats=stats) as change:
        for prompt, request in zip(prompts, requests):
            new, old = target_log_probs(smollm, [prompt], [request["target_new"],
                                                                request["target_true"]])[0]
            assert new > old, (prompt, float(new), float(old))
        assert [t["lookup_token"] for t in change.info["targets"]] == [" Tower", "if"]
    assert_same(smollm, before)


def test_memit_refuses_a_model_that_normalises_its_mlp_output(tiny_gemma):
    before = tiny_gemma.blocks[2].mlp.W_out.detach().clone()
    with pytest.raises(InputError, match=r"normalises the output of its MLPs .*layers \[1, 2\].*"
                                         r"rome.edit"):
        memit.edit(tiny_gemma, REQUESTS[:1], layers=[1, 2])
    assert torch.equal(tiny_gemma.blocks[2].mlp.W_out, before)
