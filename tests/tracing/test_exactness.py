"""``trace`` must equal the paper's one-restoration-per-pass algorithm given the same noise."""

from __future__ import annotations

import pytest
import torch

from lens_rome import locate_subject, trace
from lens_rome.reference import reference_trace
from lens_rome.tracing import Replacement, engine

TOLERANCE = 1e-4
CASES = [
    ("hidden", None), ("mlp", None), ("attn", None), ("hidden", "mlp"), ("hidden", "attn"),
]


def _compare(model, prompt, subject, kind, sever, *, samples=3, window=4, metric="prob",
             scale=1.0, positions=None, layers=None):
    tokens, subject_range = locate_subject(model, prompt, subject)
    n_subject = subject_range[1] - subject_range[0]
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(samples, n_subject, model.cfg.d_model, generator=generator) * scale
    result = trace(model, prompt, subject, kind, samples=samples, window=window, noise=noise,
                   sever=sever, metric=metric, positions=positions)
    expected, low = reference_trace(model, tokens, subject_range, result.answer_token, noise,
                                    kind, window, sever, metric=metric, positions=positions,
                                    layers=layers)
    rows = slice(None) if positions is None else torch.tensor(positions)
    cols = slice(None) if layers is None else torch.tensor(layers)
    if positions is not None and layers is not None:
        rows, cols = rows[:, None], cols[None, :]
    compared = expected[rows, cols]
    assert not compared.isnan().any()
    deviation = (result.scores[rows, cols] - compared).abs().max().item()
    print(f"largest deviation from the paper's algorithm: {deviation:.2e}")  # shown with -s
    assert abs(result.low_score - low) < TOLERANCE
    assert deviation < TOLERANCE, f"largest deviation {deviation:.2e}"
    return deviation


@pytest.mark.parametrize("kind,sever", CASES)
@pytest.mark.parametrize("architecture", ["tiny_gpt2", "tiny_llama"])
def test_trace_matches_paper_algorithm_on_tiny_models(architecture, kind, sever, request):
    model = request.getfixturevalue(architecture)
    # The subject starts after the first token: positions before it are skipped by trace,
    # and the restorations after it read earlier positions from the key/value cache.
    _compare(model, "Where is The Eiffel Tower? It is in the city of", "The Eiffel Tower",
             kind, sever)


@pytest.mark.parametrize("metric", ["prob", "logprob"])
def test_metrics_match_paper_algorithm(tiny_llama, metric):
    _compare(tiny_llama, "The Space Needle is in downtown", "The Space Needle", "mlp", None,
             metric=metric)


def test_replacement_noise_matches_paper_algorithm(tiny_gpt2):
    prompt, subject = "The Space Needle is in downtown", "Space Needle"
    tokens, subject_range = locate_subject(tiny_gpt2, prompt, subject)
    result = trace(tiny_gpt2, prompt, subject, "attn", samples=2, window=3, noise=Replacement())
    rule = Replacement().draw(tiny_gpt2, tokens[0, subject_range[0]:subject_range[1]], 2,
                              torch.Generator().manual_seed(0))
    expected, _ = reference_trace(tiny_gpt2, tokens, subject_range, result.answer_token,
                                  rule.values, "attn", 3, replace=True)
    assert (result.scores - expected).abs().max().item() < TOLERANCE


@pytest.mark.embedded
@pytest.mark.parametrize("kind,sever", [("hidden", None), ("mlp", None), ("attn", None),
                                        ("hidden", "mlp")])
def test_trace_matches_paper_algorithm_on_smollm(smollm, kind, sever):
    # The reference costs one forward pass per state: compare at the first subject token
    # (its key/value prefix holds the uncorrupted "The"), the early site "iffel", the last
    # subject token and the last token, at every third layer and the last two (the tiny
    # models compare every cell).
    layers = sorted({*range(0, smollm.cfg.n_layers, 3), smollm.cfg.n_layers - 2,
                     smollm.cfg.n_layers - 1})
    _compare(smollm, "The Eiffel Tower is in the city of", "Eiffel Tower", kind, sever,
             samples=2, window=10, scale=0.5, positions=[1, 2, 3, 8], layers=layers)


@pytest.mark.parametrize("kind,sever", [("mlp", None), ("attn", None), ("hidden", "mlp")])
def test_transformer_lens_blocks_match_paper_algorithm_too(tiny_llama, kind, sever, monkeypatch):
    # The path a model with hooks attached (or without a lean block) takes.
    monkeypatch.setattr(engine, "unsupported_reason", lambda model: "forced off")
    _compare(tiny_llama, "Where is The Eiffel Tower? It is in the city of", "The Eiffel Tower",
             kind, sever)


@pytest.mark.parametrize("architecture", ["tiny_gpt2", "tiny_llama"])
def test_head_restoration_equals_a_hand_written_hook_on_hook_z(architecture, request):
    model = request.getfixturevalue(architecture)
    prompt, subject = "Where is The Eiffel Tower? It is in the city of", "The Eiffel Tower"
    tokens, (start, end) = locate_subject(model, prompt, subject)
    noise = torch.randn(3, end - start, model.cfg.d_model,
                        generator=torch.Generator().manual_seed(5))
    result = trace(model, prompt, subject, "head", samples=3, noise=noise)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert result.scores.shape == (tokens.shape[1], n_layers, n_heads)
    _, clean = model.run_with_cache(tokens)

    def corrupt(embed, hook):
        embed[:, start:end] += noise
        return embed

    deviations = []
    for position in (start, end - 1, tokens.shape[1] - 1):
        for layer in range(n_layers):
            for head in range(n_heads):
                name = f"blocks.{layer}.attn.hook_z"

                def restore(z, hook, position=position, head=head, name=name):
                    z[:, position, head] = clean[name][0, position, head]
                    return z

                with torch.no_grad():
                    logits = model.run_with_hooks(
                        tokens.expand(3, -1), fwd_hooks=[("hook_embed", corrupt), (name, restore)])
                expected = torch.softmax(logits[:, -1].float(), -1)[:, result.answer_token].mean()
                deviations.append(abs(float(expected) - float(result.scores[position, layer, head])))
    assert max(deviations) < TOLERANCE, f"largest deviation {max(deviations):.2e}"
