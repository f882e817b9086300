"""Every entry point on a ``TransformerBridge``: the same numbers as the paper's algorithm on
the plain Hugging Face model, and as on ``HookedTransformer`` where this TransformerLens has it.

These tests run twice in ``make test``: under TransformerLens 3.9 (with the rest of the
suite) and under 4.x (``.venv-tl4``), where the comparisons with ``HookedTransformer`` skip.
"""

from __future__ import annotations

import pytest
import torch

from lens_rome import locate_subject, trace
from lens_rome.editing import rome
from lens_rome.editing.finetune import FineTune, FineTuneParams
from lens_rome.editing.statistics import key_statistics
from lens_rome.errors import InputError
from lens_rome.model.adapter import adapter_for, model_fingerprint
from lens_rome.model.backend import HAS_HOOKED
from lens_rome.reference import reference_trace
from lens_rome.reference.trace import reference_trace_hf
from lens_rome.tracing import engine

TOLERANCE = 1e-4
PROMPT, SUBJECT = "Where is The Eiffel Tower? It is in the city of", "The Eiffel Tower"
CORPUS = ["The Eiffel Tower is located in the city of Paris, France.",
          "The Colosseum is in Rome. The Louvre is in Paris."] * 40
REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": " Rome"}
needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason="TransformerLens 4.x has no HookedTransformer")


def _noise(model, prompt, subject, samples=3, scale=1.0):
    tokens, subject_range = locate_subject(model, prompt, subject)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(samples, subject_range[1] - subject_range[0], model.cfg.d_model,
                        generator=generator) * scale
    return tokens, subject_range, noise


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "gemma3"])
def test_bridge_trace_is_the_papers_on_the_hf_model(tiny_bridges, family, kind):
    bridge = tiny_bridges(family)
    tokens, subject_range, noise = _noise(bridge, PROMPT, SUBJECT)
    result = trace(bridge, PROMPT, SUBJECT, kind, samples=3, window=3, noise=noise)
    expected, low = reference_trace_hf(tiny_bridges(family, plain=True), tokens, subject_range,
                                       result.answer_token, noise, kind, 3)
    deviation = (result.scores - expected).abs().max().item()
    print(f"{family} {kind} ({result.meta['blocks']}): {deviation:.2e}")  # shown with -s
    assert abs(result.low_score - low) < TOLERANCE
    assert deviation < TOLERANCE


@pytest.mark.parametrize("sever", ["mlp", "attn"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bridge_severed_trace_is_the_papers(tiny_bridges, family, sever):
    bridge = tiny_bridges(family)
    tokens, subject_range, noise = _noise(bridge, PROMPT, SUBJECT)
    result = trace(bridge, PROMPT, SUBJECT, "hidden", samples=3, noise=noise, sever=sever)
    expected, _ = reference_trace(bridge, tokens, subject_range, result.answer_token, noise,
                                  "hidden", sever=sever)
    assert (result.scores - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("kind", ["hidden", "mlp", "head"])
def test_lean_and_whole_pass_paths_agree(tiny_bridges, monkeypatch, kind):
    bridge = tiny_bridges("llama")
    _, _, noise = _noise(bridge, PROMPT, SUBJECT)
    lean = trace(bridge, PROMPT, SUBJECT, kind, samples=3, window=3, noise=noise)
    monkeypatch.setattr(engine, "unsupported_reason", lambda model: "forced off")
    whole = trace(bridge, PROMPT, SUBJECT, kind, samples=3, window=3, noise=noise)
    assert lean.meta["blocks"] == "lens_rome.model.fast_blocks"
    assert whole.meta["blocks"] == "whole forward passes"
    assert (lean.scores - whole.scores).abs().max().item() < TOLERANCE


def test_user_hooks_apply_to_every_run_of_a_bridge_trace(tiny_bridges):
    bridge = tiny_bridges("llama")
    _, _, noise = _noise(bridge, PROMPT, SUBJECT)
    plain = trace(bridge, PROMPT, SUBJECT, "mlp", samples=3, window=3, noise=noise)
    # a user's hook, under the HookedTransformer name (an alias on the bridge)
    with bridge.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: x * 0.5)]):
        hooked = trace(bridge, PROMPT, SUBJECT, "mlp", samples=3, window=3, noise=noise)
    assert hooked.meta["blocks"] == "whole forward passes"
    assert (hooked.scores - plain.scores).abs().max().item() > 1e-3  # the hook changed things


def test_rome_and_ft_on_a_bridge_revert_bit_for_bit(tiny_bridges, tmp_path):
    bridge = tiny_bridges("gpt2")  # not Llama-style: the v* loop runs whole passes
    adapter = adapter_for(bridge)
    before = {name: p.detach().clone() for name, p in bridge.named_parameters()}
    stats = key_statistics(bridge, 2, CORPUS, samples=20, token_length=16, cache_dir=tmp_path,
                           progress=False)
    change = rome.edit(bridge, REQUEST, layer=2, stats=stats, v_steps=5, n_prefixes=2,
                       prefix_lengths=(3,))
    delta = change.weight_delta()
    assert delta.shape == (adapter.d_mlp, adapter.d_model) and torch.isfinite(delta).all()
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5) == 1
    change.revert()
    tuned = FineTune(bridge, FineTuneParams(layer=2, steps=3, norm_constraint=0.05)).apply(
        bridge, REQUEST)  # Adam on the HF parameter, clamped elementwise
    assert tuned.weight_delta().abs().max() > 0
    tuned.revert()
    for name, p in bridge.named_parameters():
        assert torch.equal(before[name], p), name


def test_backend_errors():
    from lens_rome import load_model

    with pytest.raises(InputError, match="unknown backend 'jax'"):
        load_model("smollm2-135m", backend="jax")
    if not HAS_HOOKED:
        with pytest.raises(InputError, match="backend='bridge'"):
            load_model("smollm2-135m", backend="hooked")


# ------------------------------------------------------------------ the embedded SmolLM2

SMOL_PROMPT, SMOL_SUBJECT = "The Eiffel Tower is in the city of", "Eiffel Tower"


@pytest.mark.embedded
@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_smollm_bridge_trace_is_the_papers_on_the_hf_model(smollm_bridge, smollm_hf, kind):
    positions, layers = [1, 3, 8], [0, 6, 12, 18, 24, 29]
    tokens, subject_range, noise = _noise(smollm_bridge, SMOL_PROMPT, SMOL_SUBJECT, 2, 0.5)
    result = trace(smollm_bridge, SMOL_PROMPT, SMOL_SUBJECT, kind, samples=2, noise=noise,
                   positions=positions)
    expected, low = reference_trace_hf(smollm_hf, tokens, subject_range,
                                       result.answer_token, noise, kind, 10,
                                       positions=positions, layers=layers)
    rows, cols = torch.tensor(positions)[:, None], torch.tensor(layers)[None, :]
    deviation = (result.scores[rows, cols] - expected[rows, cols]).abs().max().item()
    print(f"SmolLM2 bridge {kind}: {deviation:.2e} from the paper's algorithm on HF")
    assert abs(result.low_score - low) < TOLERANCE and deviation < TOLERANCE


@pytest.mark.embedded
@needs_hooked
def test_smollm_bridge_trace_equals_hooked_trace_with_a_user_hook(smollm_bridge, smollm):
    from lens_rome import trace_all

    hook = [("blocks.3.hook_mlp_out", lambda x, hook: x * 0.9)]
    _, _, noise = _noise(smollm, SMOL_PROMPT, SMOL_SUBJECT, 2, 0.5)
    options = dict(samples=2, noise=noise)
    plain = [trace_all(m, SMOL_PROMPT, SMOL_SUBJECT, **options) for m in (smollm, smollm_bridge)]
    for kind in ("hidden", "mlp", "attn"):
        assert (plain[0][kind].scores - plain[1][kind].scores).abs().max().item() < TOLERANCE
    with smollm.hooks(fwd_hooks=hook), smollm_bridge.hooks(fwd_hooks=hook):
        hooked = [trace(m, SMOL_PROMPT, SMOL_SUBJECT, "hidden", positions=[3, 8], **options)
                  for m in (smollm, smollm_bridge)]
    difference = (hooked[0].scores - hooked[1].scores).nan_to_num().abs().max().item()
    assert difference < TOLERANCE
    assert (hooked[1].scores - plain[1]["hidden"].scores).nan_to_num().abs().max() > 1e-3


@pytest.mark.embedded
def test_smollm_bridge_edit_equals_hooked_and_reverts(smollm_bridge, request, tmp_path):
    stats = key_statistics(smollm_bridge, 4, samples=48, token_length=64, cache_dir=tmp_path,
                           progress=False)
    options = dict(layer=4, stats=stats, v_steps=8, n_prefixes=4, prefix_lengths=(5,))
    before = {name: p.detach().clone() for name, p in smollm_bridge.named_parameters()}
    with rome.edited(smollm_bridge, REQUEST, **options) as change:
        delta = change.weight_delta().clone()
    for name, p in smollm_bridge.named_parameters():
        assert torch.equal(before[name], p), name
    if HAS_HOOKED:
        smollm = request.getfixturevalue("smollm")
        assert model_fingerprint(smollm) == model_fingerprint(smollm_bridge)
        with rome.edited(smollm, REQUEST, **options) as change:
            hooked = change.weight_delta()
            relative = float((hooked - delta).norm() / hooked.norm())
        print(f"ROME weight change, bridge vs hooked: {relative:.1e} relative")
        assert relative < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edits_on_a_processed_bridge_apply_to_the_processed_weights(tiny_bridges, tiny_tokenizer,
                                                                    family, tmp_path):
    """``enable_compatibility_mode()`` folds and centres weights into new tensors: edits
    go to those (the ones the forward pass uses) and revert bit for bit there."""
    import copy

    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        f"tiny-{family}", hf_model=copy.deepcopy(tiny_bridges(family, plain=True)),
        tokenizer=copy.deepcopy(tiny_tokenizer), device="cpu", dtype=torch.float32)
    bridge.cfg.default_prepend_bos = False
    bridge.enable_compatibility_mode()
    result = trace(bridge, PROMPT, SUBJECT, "mlp", samples=2, window=2)
    assert result.high_score > result.low_score >= 0
    tokens = locate_subject(bridge, PROMPT, SUBJECT)[0]
    before = {name: p.detach().clone() for name, p in bridge.named_parameters()}
    with torch.no_grad():
        logits = bridge(tokens)
    stats = key_statistics(bridge, 1, CORPUS, samples=20, token_length=16, cache_dir=tmp_path,
                           progress=False)
    with rome.edited(bridge, REQUEST, layer=1, stats=stats, v_steps=3, n_prefixes=2,
                     prefix_lengths=(3,)):
        with torch.no_grad():
            assert (bridge(tokens) - logits).abs().max() > 1e-3  # the edit reaches the forward
    for name, p in bridge.named_parameters():
        assert torch.equal(before[name], p), name


@pytest.mark.embedded
def test_gemma_bridge_trace_is_the_papers_on_the_hf_model():
    """Gemma-3-270M (embedded; BOS, scaled embeddings, sliding windows): whole passes."""
    from lens_rome import load_model
    from lens_rome.model.loading import load_hf_model

    bridge, plain = load_model("gemma-3-270m", backend="bridge"), load_hf_model("gemma-3-270m")[0]
    tokens, subject_range, noise = _noise(bridge, SMOL_PROMPT, SMOL_SUBJECT, 2, 0.5)
    last_subject, layers = subject_range[1] - 1, [0, 6, 12, 17]
    for kind in ("hidden", "mlp"):
        result = trace(bridge, SMOL_PROMPT, SMOL_SUBJECT, kind, samples=2, noise=noise,
                       positions=[last_subject])
        expected, low = reference_trace_hf(plain, tokens, subject_range, result.answer_token,
                                           noise, kind, 10, positions=[last_subject],
                                           layers=layers)
        deviation = (result.scores[last_subject, layers] - expected[last_subject, layers]
                     ).abs().max().item()
        print(f"Gemma-3-270M bridge {kind}: {deviation:.2e} from the paper's algorithm on HF")
        assert abs(result.low_score - low) < TOLERANCE and deviation < TOLERANCE
    if HAS_HOOKED:  # the default noise too: its level comes from W_E, scaled as hook_embed sees it
        hooked = load_model("gemma-3-270m", backend="hooked")
        default = [trace(m, SMOL_PROMPT, SMOL_SUBJECT, "hidden", samples=2,
                         positions=[last_subject]) for m in (hooked, bridge)]
        assert (default[0].scores - default[1].scores).nan_to_num().abs().max() < TOLERANCE
