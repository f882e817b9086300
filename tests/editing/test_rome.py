"""ROME: requests, hyper-parameters, the rank-one update, and the Edit object."""

from __future__ import annotations

import pytest
import torch

from lens_rome.data.requests import EditRequest
from lens_rome.editing import hparams, rome, values
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.layout import lookup_position
from lens_rome.editing.prefixes import _generate_prefixes
from lens_rome.editing.rome import Edit
from lens_rome.editing.statistics import key_statistics
from lens_rome.editing.values import _layout, key_and_value
from lens_rome.editing.weights import applied_edits
from lens_rome.evaluation.measures import greedy_continuation, target_log_probs
from lens_rome.model.adapter import adapter_for

CORPUS = [
    "The Eiffel Tower is located in the city of Paris, France.",
    "The Space Needle is in downtown Seattle, and Miles Davis plays the trumpet.",
    "The Colosseum is in Rome. The Louvre is in Paris.",
] * 40
REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": " Rome"}
FAST = dict(v_steps=3, n_prefixes=4, prefix_lengths=(3, 5))


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def tiny(request, tmp_path):
    model = request.getfixturevalue(request.param)
    stats = key_statistics(model, 2, CORPUS, samples=20, token_length=16,
                           cache_dir=tmp_path, progress=False)
    return model, stats


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p), name


# --------------------------------------------------------------------------- requests


def test_request_shapes():
    plain = EditRequest.parse(REQUEST)
    assert plain.text == "The Eiffel Tower is located in the city of"
    counterfact = EditRequest.parse({"case_id": 0, "requested_rewrite": {
        "prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
        "relation_id": "P131", "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}}})
    assert counterfact.target_new == " Rome" and counterfact.target_true == " Paris"
    assert EditRequest.parse(plain) is plain


@pytest.mark.parametrize("change, message", [
    ({"target_new": ""}, "target_new must be a non-empty"),
    ({"target_new": "   "}, "target_new must be a non-empty"),
    ({"prompt": "{} is in {}"}, "once"),
    ({"prompt": "The Eiffel Tower is located in"}, "has no '{}'"),
    ({"prompt": "It is located in"}, "is not in prompt"),
    ({"subject": ""}, "subject must be"),
])
def test_request_errors(change, message):
    with pytest.raises(ValueError, match=message):
        EditRequest.parse({**REQUEST, **change})


def test_request_type_errors():
    with pytest.raises(TypeError, match="dict"):
        EditRequest.parse("The Eiffel Tower")
    with pytest.raises(ValueError, match="lacks"):
        EditRequest.parse({"prompt": "{} is"})


def test_hyperparameters(tiny_llama):
    hp = RomeHyperParams.for_model("smollm2-135m")
    assert hp.layer == hparams.MODEL_DEFAULTS["smollm2-135m"]["layer"]
    assert RomeHyperParams.for_model("smollm2-135m", v_steps=3).v_steps == 3
    assert RomeHyperParams.for_model(tiny_llama).layer == 1  # a quarter of 6 layers
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        RomeHyperParams.for_model(tiny_llama, steps=3)
    with pytest.raises(ValueError, match="lookup"):
        RomeHyperParams(layer=1, lookup="middle")
    with pytest.raises(ValueError, match="no default edit layer"):
        RomeHyperParams.for_model("no-such-model")
    with pytest.raises(ValueError, match="kl_direction must be one of"):
        RomeHyperParams(layer=1, kl_direction="both")
    with pytest.raises(ValueError, match="prefixes must be texts"):
        RomeHyperParams(layer=1, prefixes=[3])
    texts = RomeHyperParams(layer=1, prefixes=["I think", "You know"])
    assert texts.prefixes == ("I think", "You know")
    assert RomeHyperParams.from_dict(texts.to_dict()) == texts


def test_defaults_are_the_papers():
    """Every model's defaults are the paper's v* settings; only the layer differs."""
    paper = {"v_steps": 20, "v_lr": 0.5, "kl_weight": 0.0625, "weight_decay": 0.5,
             "clamp_norm": 4.0, "early_stop_loss": 0.05, "early_stop_nll": 0.0,
             "n_prefixes": 20, "prefix_lengths": (5, 10), "norm_reference": "mlp_out",
             "kl_direction": "edited_original", "kl_position": "lookup",
             "weight_decay_form": "norm", "update_key": "bare"}
    for name in hparams.MODEL_DEFAULTS:
        hp = RomeHyperParams.for_model(name)
        assert {k: getattr(hp, k) for k in paper} == paper, name


def test_lookup_positions():
    # prompt of 8 tokens, subject at tokens 1..3
    assert lookup_position("subject_last", (1, 4), 8) == 3
    assert lookup_position("subject_first", (1, 4), 8) == 1
    assert lookup_position("last", (1, 4), 8) == 7
    assert lookup_position(2, (1, 4), 8) == 2
    assert lookup_position(-1, (1, 4), 8) == 7
    # the same index in a tokenization with one more token before the subject
    assert lookup_position(2, (2, 5), 9, reference=((1, 4), 8)) == 3
    assert lookup_position(6, (2, 5), 9, reference=((1, 4), 8)) == 7
    with pytest.raises(ValueError, match="out of range"):
        lookup_position(8, (1, 4), 8)


def test_prefixes_are_deterministic(tiny_llama):
    a = _generate_prefixes(adapter_for(tiny_llama), 4, (3, 5), 0, 5)
    b = _generate_prefixes(adapter_for(tiny_llama), 4, (3, 5), 0, 5)
    assert a == b and sorted(len(p) for p in a) == [3, 3, 5, 5]
    assert _generate_prefixes(adapter_for(tiny_llama), 4, (3, 5), 1, 5) != a


# --------------------------------------------------------------------------- the update


def test_edit_is_rank_one_and_inserts_the_value(tiny):
    model, stats = tiny
    weight = model.blocks[2].mlp.W_out
    before = weight.detach().clone()
    change = rome.edit(model, REQUEST, layer=2, stats=stats, **FAST)
    try:
        diff = (weight.detach() - before).double()
        assert torch.linalg.matrix_rank(diff, rtol=1e-5) == 1
        # the prompt's own key now maps to W k0 + delta: C^-1 k* direction, only that layer changed
        assert torch.allclose(diff, change.weight_delta().double(), atol=1e-5)
        others = [b.mlp.W_out for i, b in enumerate(model.blocks) if i != 2]
        assert all(w.grad is None for w in others)
    finally:
        change.revert()
    assert torch.equal(weight, before)


def test_edit_follows_the_paper_formula(tiny_llama, tmp_path):
    """left is C^-1 k* (normalised), and the bare prompt's key gets exactly v* = W k0 + delta."""
    model = tiny_llama
    stats = key_statistics(model, 2, CORPUS, samples=20, token_length=16,
                           cache_dir=tmp_path, progress=False)
    hp = RomeHyperParams(layer=2, **FAST)
    kv = key_and_value(adapter_for(model), EditRequest.parse(REQUEST), hp)
    change = rome.edit(model, REQUEST, hparams=hp, stats=stats)
    try:
        u = torch.linalg.solve(stats.second_moment, kv.key)
        torch.testing.assert_close(change.left.double(), u / u.norm(), rtol=1e-4, atol=1e-6)
        moved = kv.bare_key.float() @ change.weight_delta()
        torch.testing.assert_close(moved, kv.delta, rtol=1e-3, atol=1e-4)
    finally:
        change.revert()


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", "tiny_gemma", "gemma3 bridge"])
def test_the_v_star_loop_adds_delta_to_the_output_of_w_out(name, request):
    """The loop's log-probabilities with ``delta`` are the model's with ``delta`` added to the
    output of the MLP's ``W_out`` at the lookup token, where ROME's update puts it; also
    where a norm follows the MLP (Gemma: the residual stream gets it through the norm)."""
    model = (request.getfixturevalue("tiny_bridges")("gemma3") if name.endswith("bridge")
             else request.getfixturevalue(name))
    adapter, layer = adapter_for(model), 1  # the tiny Gemma 3's sliding window is 8 tokens
    specs, _, _ = _layout(adapter, EditRequest.parse(REQUEST), RomeHyperParams(layer=layer,
                                                                              n_prefixes=0))
    rows, lookup, positions, target = specs[0]
    group = values._Group(adapter, layer, rows, lookup, positions, target).cast(torch.float32)
    norm = adapter.mlp_post_norm(layer)
    assert (norm is not None) == ("gemma" in name)
    if norm is not None:
        group.pass_through(norm)
    delta = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        loop = group.log_probs(delta)[0]
        assert (loop - group.log_probs(torch.zeros_like(delta))[0]).abs().max() > 0.01  # not vacuous

        def add(module, inputs, output):  # the MLP module's output is W_out's
            output[:, group.p] += delta

        handle = model.blocks[layer].mlp.register_forward_hook(add)
        try:
            tokens = adapter.as_tokens([adapter.bos + r for r in rows])
            logits = model(tokens)[0, [q + adapter.n_bos for q in positions]]
        finally:
            handle.remove()
    torch.testing.assert_close(loop, torch.log_softmax(logits, -1), rtol=1e-4, atol=1e-4)


def test_the_value_of_a_gemma_style_edit_passes_through_the_post_mlp_norm(tiny_gemma,
                                                                         tmp_path):
    adapter = adapter_for(tiny_gemma)
    assert adapter.mlp_post_norm(2) is tiny_gemma.blocks[2].ln2_post
    stats = key_statistics(tiny_gemma, 2, CORPUS, samples=20, token_length=16,
                           cache_dir=tmp_path, progress=False)
    hp = RomeHyperParams(layer=2, **FAST)
    kv = key_and_value(adapter, EditRequest.parse(REQUEST), hp)
    with rome.edited(tiny_gemma, REQUEST, hparams=hp, stats=stats) as change:
        # the bare prompt's key gets exactly v* = W k0 + delta, before the norm
        moved = kv.bare_key.float() @ change.weight_delta()
        torch.testing.assert_close(moved, kv.delta, rtol=1e-3, atol=1e-4)
    # the clamp is relative to the norm of W_out's output there, not to the normed output
    value = adapter.mlp_value(2, kv.bare_key[None])[0]
    assert kv.delta.norm() <= hp.clamp_norm * value.norm() * (1 + 1e-5)


def test_revert_is_bit_exact_for_stacked_edits(tiny):
    model, stats = tiny
    before = snapshot(model)
    first = rome.edit(model, REQUEST, layer=2, stats=stats, **FAST)
    second = rome.edit(model, {**REQUEST, "subject": "The Colosseum", "target_new": " Paris"},
                       layer=2, stats=stats, **FAST)
    assert applied_edits(model) == [first, second]
    with pytest.raises(RuntimeError, match="reverse order"):
        first.revert()
    second.revert()
    first.revert()
    assert_same(model, before)
    assert applied_edits(model) == []
    with pytest.raises(RuntimeError, match="not applied"):
        first.revert()


def test_edited_context_manager_reverts_on_error(tiny):
    model, stats = tiny
    before = snapshot(model)
    with pytest.raises(KeyError):
        with rome.edited(model, REQUEST, layer=2, stats=stats, **FAST) as change:
            assert change.applied
            raise KeyError("boom")
    assert_same(model, before)


def test_save_load_apply(tiny, tmp_path):
    model, stats = tiny
    before = snapshot(model)
    change = rome.edit(model, REQUEST, layer=2, stats=stats, **FAST)
    edited_weight = model.blocks[2].mlp.W_out.detach().clone()
    path = change.save(tmp_path / "eiffel.safetensors")
    with pytest.raises(FileExistsError):
        change.save(path)
    change.save(path, overwrite=True)
    change.revert()

    loaded = Edit.load(path)
    assert not loaded.applied and loaded.layer == 2
    assert loaded.request == EditRequest.parse(REQUEST)
    loaded.apply(model)
    assert torch.equal(model.blocks[2].mlp.W_out, edited_weight)
    with pytest.raises(RuntimeError, match="already applied"):
        loaded.apply(model)
    loaded.revert()
    assert_same(model, before)


def test_edit_refuses_another_model(tiny_llama, tiny_gpt2, tmp_path):
    stats = key_statistics(tiny_llama, 2, CORPUS, samples=20, token_length=16,
                           cache_dir=tmp_path, progress=False)
    change = rome.edit(tiny_llama, REQUEST, layer=2, stats=stats, **FAST)
    change.revert()
    path = change.save(tmp_path / "edit.safetensors")
    before = snapshot(tiny_gpt2)
    with pytest.raises(ValueError, match="made for model 'tiny'.*fingerprint"):
        Edit.load(path).apply(tiny_gpt2)
    assert_same(tiny_gpt2, before)


def test_load_rejects_garbage(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable lens_rome edit"):
        Edit.load(path)


def test_edit_errors(tiny):
    model, stats = tiny
    with pytest.raises(ValueError, match="out of range"):
        rome.edit(model, REQUEST, layer=6, stats=stats)
    with pytest.raises(ValueError, match="target_new must be a non-empty"):
        rome.edit(model, {**REQUEST, "target_new": ""}, layer=2, stats=stats)
    with pytest.raises(ValueError, match="key statistics are for layer 2"):
        rome.edit(model, REQUEST, layer=3, stats=stats, **FAST)
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        rome.edit(model, REQUEST, layer=2, stats=stats, steps=3)
    assert applied_edits(model) == []


def test_edit_longer_than_the_context_is_refused(tiny_llama):
    long_prompt = "{} is located" + " in the city" * 30 + " of"
    with pytest.raises(ValueError, match="the edit prompt 'The Eiffel Tower is located in the "
                                         "city.* is [0-9]+ tokens long, but tiny accepts at "
                                         "most 64 tokens"):
        rome.edit(tiny_llama, {**REQUEST, "prompt": long_prompt}, layer=2,
                  stats=torch.eye(128, dtype=torch.float64), **FAST)
    assert applied_edits(tiny_llama) == []


def test_one_batch_of_lean_blocks_equals_transformer_lens_layouts(tiny_llama):
    """The v* loop's padded single batch computes what the per-layout runs do."""
    stats = torch.eye(tiny_llama.cfg.d_mlp, dtype=torch.float64)
    results = {}
    for lean in (True, False):
        with rome.edited(tiny_llama, REQUEST, layer=2, stats=stats, lean_blocks=lean,
                         v_steps=4, n_prefixes=6) as change:
            results[lean] = change
    assert results[True].info["blocks"] == "lens_rome.model.fast_blocks"
    assert results[False].info["blocks"] == "transformer_lens"
    for a, b in zip(results[True].info["v_history"], results[False].info["v_history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    right_lean, right_tl = results[True].right, results[False].right
    assert float((right_lean - right_tl).norm() / right_tl.norm()) < 1e-4


@pytest.mark.parametrize("lookup", ["subject_first", "last", 1])
def test_lookup_strategies_run(tiny_llama, tmp_path, lookup):
    stats = key_statistics(tiny_llama, 2, CORPUS, samples=20, token_length=16,
                           cache_dir=tmp_path, progress=False)
    with rome.edited(tiny_llama, REQUEST, layer=2, stats=stats, lookup=lookup, **FAST) as change:
        assert change.hparams["lookup"] == lookup


def test_target_log_probs_match_single_runs(tiny_llama):
    prompts = ["The Eiffel Tower is in", "Miles Davis plays the"]
    targets = [" Paris", " trumpet of Rome"]
    scores = target_log_probs(tiny_llama, prompts, targets)
    tokenizer = tiny_llama.tokenizer
    for i, prompt in enumerate(prompts):
        for j, target in enumerate(targets):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            t = tokenizer(target, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(tiny_llama(torch.tensor([p + t])), -1)[0]
            expected = lp[torch.arange(len(p) - 1, len(p) + len(t) - 1), t].mean()
            assert abs(float(expected) - float(scores[i, j])) < 1e-4


# --------------------------------------------------------------------------- embedded model


@pytest.fixture
def one_thread():
    """On a busy 2-core machine, two torch threads wait on each other for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.embedded
def test_smollm_edit_rewrites_and_reverts(smollm, tmp_path, one_thread):
    stats = key_statistics(smollm, 4, samples=48, token_length=64, cache_dir=tmp_path,
                           progress=False)
    before = snapshot(smollm)
    prompts = ["The Eiffel Tower is located in the city of", "The Eiffel Tower is in"]
    old = target_log_probs(smollm, prompts, [" Paris", " Rome"])
    assert old[0, 0] > old[0, 1]
    with rome.edited(smollm, REQUEST, layer=4, stats=stats, v_steps=8, n_prefixes=4,
                     prefix_lengths=(5,)) as change:
        assert change.info["lookup_token"] == " Tower"
        new = target_log_probs(smollm, prompts, [" Paris", " Rome"])
        assert new[0, 1] > new[0, 0]
        assert "Rome" in greedy_continuation(smollm, prompts[0], 3)
    assert_same(smollm, before)


# --------------------------------------------------------------------------- command line


def cli(*argv):
    import argparse

    from lens_rome.cli.edit import add_edit_parser

    parser = argparse.ArgumentParser(prog="lens-rome")
    add_edit_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["edit", *argv])
    return args.run(args)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "{} is in", "--subject", "X", "--target", ""], "target_new must be"),
    (["--prompt", "X is in", "--subject", "X", "--target", " Rome"], "has no '{}'"),
    (["--prompt", "It is in", "--subject", "X", "--target", " Rome"], "is not in prompt"),
    (["--prompt", "{} is in", "--subject", "X", "--target", " Rome", "--lookup", "middle"],
     "lookup must be"),
])
def test_cli_errors(argv, message, capsys):
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "edit.safetensors"
    path.write_bytes(b"")
    assert cli("--prompt", "{} is in", "--subject", "X", "--target", " Rome",
               "--save", str(path)) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("kl", [False, True])
def test_lean_setup_states_equal_transformer_lens(tiny_llama, kl):
    """k*, the MLP output, the residual stream and the cached keys/values of the v* loop's
    setup are the same from the lean blocks as from TransformerLens' blocks."""
    from lens_rome.model.adapter import adapter_for
    from lens_rome.model.fast_blocks import FastBlocks

    adapter = adapter_for(tiny_llama)
    hp = RomeHyperParams.for_model(tiny_llama, layer=2, n_prefixes=4)
    specs, (kl_ids, kl_lookup, kl_read), _ = _layout(adapter, EditRequest.parse(REQUEST),
                                                          hp)
    rows, lookup, positions, target = specs[-1]
    args = ([kl_ids], kl_lookup, [kl_read], None) if kl else (rows, lookup, positions, target)
    with torch.no_grad():
        fast = FastBlocks(tiny_llama)
        lean = values._Group(adapter, 2, *args, fast).cast(torch.float32, fast)
        reference = values._Group(adapter, 2, *args).cast(torch.float32, fast)
    scale = float(reference.resid.abs().max())
    for name in ("keys", "mlp_out", "resid"):
        got, expected = getattr(lean, name), getattr(reference, name)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) < 1e-5 * scale, name
    assert lean.prefix.keys() == reference.prefix.keys()
    for b in reference.prefix:
        for got, expected in zip(lean.prefix[b], reference.prefix[b]):
            assert got.shape == expected.shape and got.shape[1] == reference.p
            assert float((got - expected).abs().max()) < 1e-5 * scale
    if kl:
        assert float((lean.original - reference.original).abs().max()) < 1e-4
