"""ROME's default edit is the paper's algorithm: equal to a transcription of its code."""

from __future__ import annotations

import pytest
import torch

from lens_rome.editing import key_statistics, rome
from lens_rome.reference import rome_weight_change

REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": " Rome"}
PREFIXES = ("The city was quiet", "Because it rained all day", "I think", "You know what")
CORPUS = [
    "The Eiffel Tower is located in the city of Paris, France.",
    "The Space Needle is in downtown Seattle, and Miles Davis plays the trumpet.",
    "The Colosseum is in Rome. The Louvre is in Paris.",
] * 40
# float32 on two code paths (lean blocks against TransformerLens' blocks, one padded batch
# against per-layout runs) drifts apart through 20 Adam steps by ~1e-4 relative
TOLERANCE = 1e-3


def relative_difference(model, layer, second_moment, **options):
    weight = model.blocks[layer].mlp.W_out
    before = weight.detach().clone()
    with rome.edited(model, REQUEST, layer=layer, stats=second_moment, prefixes=PREFIXES,
                     **options) as change:
        ours = (weight.detach() - before).double()
        steps = len(change.info["v_history"])
    assert torch.equal(weight, before)
    history = []
    theirs = rome_weight_change(model, model.tokenizer, REQUEST, layer, PREFIXES,
                                second_moment, history=history).double()
    return float((ours - theirs).norm() / theirs.norm()), steps, len(history)


def assert_equals_the_paper(model, layer, second_moment, label):
    difference, steps, paper_steps = relative_difference(model, layer, second_moment)
    print(f"{label} layer {layer}: relative Frobenius difference {difference:.2e}, {steps} v* "
          f"steps (paper's code: {paper_steps})")
    assert steps == paper_steps
    assert difference < TOLERANCE


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_default_edit_equals_the_papers_code_on_tiny_models(name, request, tmp_path):
    model = request.getfixturevalue(name)
    stats = key_statistics(model, 2, CORPUS, samples=20, token_length=16, cache_dir=tmp_path,
                           progress=False)
    assert_equals_the_paper(model, 2, stats.second_moment, name)


def test_departures_are_not_the_papers_algorithm(tiny_llama, tmp_path):
    """Each named departure changes the edit: the oracle test above would catch one left on."""
    stats = key_statistics(tiny_llama, 2, CORPUS, samples=20, token_length=16,
                           cache_dir=tmp_path, progress=False)
    for option in ({"kl_direction": "original_edited"}, {"kl_position": "last"},
                   {"weight_decay_form": "squared"}):
        difference, _, _ = relative_difference(tiny_llama, 2, stats.second_moment, **option)
        assert difference > 10 * TOLERANCE, option


@pytest.mark.embedded
def test_default_edit_equals_the_papers_code_on_smollm2(smollm, tmp_path):
    stats = key_statistics(smollm, 5, samples=48, token_length=64, cache_dir=tmp_path,
                           progress=False)
    assert_equals_the_paper(smollm, 5, stats.second_moment, "SmolLM2")
