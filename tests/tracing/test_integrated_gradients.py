"""Integrated-gradient attribution (``steps``): one point is the first-order estimate, a cut
through the network is complete (its attributions add up to the total effect), and every
kind and corruption runs."""

from __future__ import annotations

import pytest
import torch

from lens_rome.errors import InputError
from lens_rome.model.adapter import adapter_for
from lens_rome.model.hooks import attached
from lens_rome.tracing.attribution import (
    DEFAULT_STEPS,
    attribute,
    attribute_many,
    interpolation_points,
)
from lens_rome.tracing.noise_rules import Gaussian, SubjectSwap, corrupt, draw_corruption
from lens_rome.tracing.subject import locate_subject

PROMPT = "Where is The Eiffel Tower? It is in the city of"
SUBJECT = "The Eiffel Tower"
KINDS = ("hidden", "mlp", "attn", "head")


def first_order_by_hand(model, kind, samples=3, level=0.3, seed=0, window=1):
    """(clean - corrupted) . d log p / d node at the corrupted run, written out here:
    ``[n_tokens, n_layers(, head)]`` indirect effects (no window)."""
    adapter = adapter_for(model)
    tokens, (start, end) = locate_subject(model, PROMPT, SUBJECT)
    drawn, _ = draw_corruption(Gaussian(level=level), adapter, tokens[0, start:end], samples, seed)
    names = [adapter.hook_name(kind, layer) for layer in range(adapter.n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    answer = int(logits[0, -1].argmax())
    kept = {}

    def keep(activation, hook):
        kept[hook.name] = activation

    def track(activation, hook):
        activation.requires_grad_(True)

    embed = adapter.hook_name("embed")
    hooks = [corrupt(drawn.values, (start, end), hook_name=embed), (embed, track)]
    with torch.enable_grad(), attached(model, hooks + [(name, keep) for name in names]):
        out = model(tokens.expand(samples, -1))[:, -1].float()
    log_p = out[:, answer] - torch.logsumexp(out, -1)
    grads = torch.autograd.grad(log_p.sum(), [kept[name] for name in names])
    effects = torch.stack([((cache[name] - kept[name].detach()) * grad).sum(-1).mean(0)
                           for name, grad in zip(names, grads)], dim=1)
    effects[:start] = 0.0
    return effects


@pytest.mark.parametrize("architecture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_point_is_the_first_order_estimate(architecture, kind, request):
    """steps=1 is the gradient at the corrupted run, as written out by hand (float32
    rounding apart: the library unembeds the last position only, and adds the corrupted
    score to float32 scores)."""
    model = request.getfixturevalue(architecture)
    estimate = attribute(model, PROMPT, SUBJECT, kind, samples=3, window=1,
                         noise=Gaussian(level=0.3), steps=1)
    expected = first_order_by_hand(model, kind)
    got = estimate.scores - estimate.low_score
    assert (got - expected).abs().max() < 1e-5, (got - expected).abs().max()
    assert estimate.meta["steps"] == 1


def test_one_point_and_the_default_are_the_same_estimate_where_the_default_is_one(tiny_llama):
    """With qk_fix the default is one point (the fix is defined at the corrupted run)."""
    options = dict(samples=2, noise=Gaussian(level=0.3), qk_fix=True)
    default = attribute(tiny_llama, PROMPT, SUBJECT, "hidden", **options)
    one = attribute(tiny_llama, PROMPT, SUBJECT, "hidden", steps=1, **options)
    assert torch.equal(default.scores, one.scores)


def test_interpolation_points_are_the_trapezoid_rule():
    alphas, weights = interpolation_points(5)
    assert alphas.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert weights.tolist() == [0.125, 0.25, 0.25, 0.25, 0.125]
    assert interpolation_points(1)[0].tolist() == [0.0]
    # the rule integrates a straight line exactly
    assert float((weights * (3 * alphas + 1)).sum()) == pytest.approx(2.5)


@pytest.mark.parametrize("architecture", ["tiny_gpt2", "tiny_llama"])
def test_a_cut_through_the_network_is_complete(architecture, request):
    """Interpolating the residual stream after one block at every position: that layer's
    attributions sum to clean minus corrupted as the points grow (the trapezoid rule's
    error falls as 1 / steps^2 once the points resolve the path; these random models are
    far more curved than a trained one, so few points are not yet in that regime)."""
    model = request.getfixturevalue(architecture)
    layer = 2
    options = dict(samples=3, noise=Gaussian(level=0.5), cut=layer)
    errors = {}
    for steps in (DEFAULT_STEPS, 9, 17, 65):
        result = attribute(model, PROMPT, SUBJECT, "hidden", steps=steps, **options)
        summed = float((result.scores - result.low_score)[:, layer].sum())
        errors[steps] = abs(summed - result.total_effect) / abs(result.total_effect)
    assert abs(result.total_effect) > 0.5, "the corruption must move the answer"
    assert errors[65] < errors[17] < errors[9], errors
    assert errors[65] < 1e-3, errors
    print(f"{architecture}: relative error of the sum at {DEFAULT_STEPS} points "
          f"{errors[DEFAULT_STEPS]:.3f}")
    # At the default points the sum is only roughly the total effect (8% and 32% off here):
    # the default is chosen for ranking (docs/tracing.md), not for sums.
    assert errors[DEFAULT_STEPS] < 0.5, errors


def test_the_points_share_the_corrupted_run(tiny_llama):
    """The corrupted score (point 0) is the same however many points run with it."""
    one = attribute(tiny_llama, PROMPT, SUBJECT, "hidden", samples=3, steps=1,
                    noise=Gaussian(level=0.3))
    many = attribute(tiny_llama, PROMPT, SUBJECT, "hidden", samples=3, steps=6,
                     noise=Gaussian(level=0.3))
    assert many.low_score == pytest.approx(one.low_score, abs=1e-5)
    assert many.high_score == pytest.approx(one.high_score, abs=1e-6)
    assert many.meta["steps"] == 6


@pytest.mark.parametrize("noise", ["gaussian", "swap"])
@pytest.mark.parametrize("metric", ["logprob", "prob", "logit_diff"])
def test_every_kind_and_corruption_runs_with_many_points(tiny_llama, noise, metric):
    """More points move the estimate (it is not the first-order one) and keep its layout."""
    rule = Gaussian(level=0.5) if noise == "gaussian" else SubjectSwap(
        ["The Seattle Tower", "Miles Davis Tower"])
    options = dict(samples=2, noise=rule, metric=metric, window=3)
    one = attribute_many(tiny_llama, PROMPT, SUBJECT, KINDS, steps=1, **options)
    many = attribute_many(tiny_llama, PROMPT, SUBJECT, KINDS, steps=5, **options)
    for a, b in zip(one, many):
        assert a.scores.shape == b.scores.shape and a.kind == b.kind
        assert b.low_score == pytest.approx(a.low_score, abs=1e-4)
        assert not torch.allclose(a.scores, b.scores, atol=1e-6), a.kind
        start = b.subject_range[0]
        assert torch.all(b.scores[:start] == b.low_score)


def test_a_straight_path_adds_nothing_where_the_model_is_linear(linear_model):
    """On an affine model the gradient is the same at every point: many points equal one."""
    model = linear_model
    options = dict(samples=2, noise=Gaussian(level=0.3), metric="logit_diff", contrast=" Rome")
    one = attribute(model, PROMPT, SUBJECT, "mlp", steps=1, **options)
    many = attribute(model, PROMPT, SUBJECT, "mlp", steps=4, **options)
    assert torch.allclose(one.scores, many.scores, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(steps=0), "steps"),
    (dict(steps=4, qk_fix=True), "qk_fix apply at the corrupted run only"),
    (dict(steps=4, grad_drop=True), "grad_drop apply at the corrupted run only"),
    (dict(steps=4, cut=99), "cut=99 must be a layer"),
    (dict(steps=1, cut=2), "needs steps > 1"),
])
def test_bad_steps_are_named(tiny_gpt2, kwargs, message):
    with pytest.raises(InputError, match=message):
        attribute(tiny_gpt2, PROMPT, SUBJECT, "hidden", samples=2, **kwargs)
