"""Attribution patching: exact where the model is linear, a true derivative where it is not,
the AtP* fixes against independent computations, per-head restoration against a hand-written
hook, and verify()."""

from __future__ import annotations

import pytest
import torch

from lens_rome.errors import InputError
from lens_rome.model.adapter import adapter_for
from lens_rome.tracing import interventions, noise_rules
from lens_rome.tracing.attribution import DEFAULT_STEPS, attribute, attribute_many, recompute_qkv
from lens_rome.tracing.engine import trace, window_layers
from lens_rome.tracing.noise_rules import (
    Gaussian,
    SubjectSwap,
    Uniform,
    corrupt,
    draw_corruption,
)
from lens_rome.tracing.result import TraceResult
from lens_rome.tracing.subject import answer_token, locate_subject
from lens_rome.tracing.verify import (
    Verification,
    ranked_sites,
    restore_sites,
    spearman,
    verify,
)

PROMPT = "Where is The Eiffel Tower? It is in the city of"
SUBJECT = "The Eiffel Tower"
NODE = {"hidden": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out",
        "attn": "blocks.{}.hook_attn_out", "head": "blocks.{}.attn.hook_z"}


def all_sites(result: TraceResult) -> list[tuple[int, ...]]:
    """Every site from the subject's first token on."""
    shape = tuple(result.scores.shape)
    grid = torch.cartesian_prod(*[torch.arange(n) for n in shape]).view(-1, len(shape))
    return [tuple(s) for s in grid.tolist() if s[0] >= result.subject_range[0]]


def estimated_effects(result: TraceResult, sites) -> torch.Tensor:
    return torch.tensor([float(result.scores[s]) - result.low_score for s in sites])


LINEAR = dict(samples=3, noise=Gaussian(level=5.0), metric="logit_diff",
              target=" Paris", contrast=" Rome")


def test_the_linear_model_is_linear(linear_model):
    """The premise of the exactness test: ReLU never clips, in clean or corrupted runs."""
    tokens, subject_range = locate_subject(linear_model, PROMPT, SUBJECT)
    noise = torch.randn(3, subject_range[1] - subject_range[0], 32) * 10.0  # twice LINEAR's
    with linear_model.hooks(fwd_hooks=[corrupt(noise, subject_range)]):
        _, cache = linear_model.run_with_cache(tokens.expand(3, -1))
    assert min(cache[f"blocks.{l}.mlp.hook_pre"].min().item() for l in range(4)) > 0


@pytest.mark.parametrize("qk_fix", [False, True])
@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn", "head"])
def test_attribution_is_exact_for_a_linear_metric_on_a_linear_model(linear_model, kind, qk_fix):
    """For single nodes (window 1) the first-order estimate of every site equals its exact
    restoration, with or without the QK fix (which must then change nothing)."""
    estimate = attribute(linear_model, PROMPT, SUBJECT, kind, window=1, qk_fix=qk_fix, **LINEAR)
    sites = all_sites(estimate)
    exact, low, high = restore_sites(linear_model, PROMPT, SUBJECT, kind, sites, window=1,
                                     **LINEAR)
    assert low == pytest.approx(estimate.low_score, abs=1e-5)
    assert high == pytest.approx(estimate.high_score, abs=1e-5)
    effects = exact - low
    assert effects.abs().max() > 0.05  # the corruption does move the metric
    torch.testing.assert_close(estimated_effects(estimate, sites), effects, atol=2e-4, rtol=1e-4)


def additive_patch_effects(model, kind, sites, window, samples=3):
    """Exact effect of *adding* clean - corrupted at every layer of each site's window."""
    tokens, subject_range = locate_subject(model, PROMPT, SUBJECT)
    drawn, _ = draw_corruption(LINEAR["noise"], adapter_for(model),
                                     tokens[0, subject_range[0]:subject_range[1]], samples, 0)
    corrupt = noise_rules.corrupt(drawn.values, subject_range)
    paris, rome = (answer_token(model, t) for t in (" Paris", " Rome"))
    _, clean = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=[corrupt]):
        base, corrupted = model.run_with_cache(tokens.expand(samples, -1))
    metric = lambda logits: (logits[:, -1, paris] - logits[:, -1, rome]).mean().item()  # noqa
    out = []
    for token, layer in sites:
        def add(x, hook, token=token):
            x[:, token] += clean[hook.name][0, token] - corrupted[hook.name][:, token]
            return x
        names = [NODE[kind].format(l) for l in window_layers(layer, window, model.cfg.n_layers)]
        with model.hooks(fwd_hooks=[corrupt] + [(name, add) for name in names]):
            out.append(metric(model(tokens.expand(samples, -1))) - metric(base))
    return torch.tensor(out)


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_a_window_estimate_adds_the_layers_differences(linear_model, kind):
    """A window's estimate is the sum of its layers' estimates: on a linear model it equals
    adding clean - corrupted at every layer of the window, which differs from restoring
    the window where one restored layer feeds another."""
    estimate = attribute(linear_model, PROMPT, SUBJECT, kind, window=3, **LINEAR)
    sites = all_sites(estimate)
    added = additive_patch_effects(linear_model, kind, sites, window=3)
    torch.testing.assert_close(estimated_effects(estimate, sites), added, atol=2e-4, rtol=1e-4)
    exact, low, _ = restore_sites(linear_model, PROMPT, SUBJECT, kind, sites, window=3, **LINEAR)
    assert (exact - low - added).abs().max() > 1e-3


def finite_difference(model, kind, site, *, samples=2, eps=1e-2, metric="logprob"):
    """d metric / d epsilon of adding epsilon * (clean - corrupted) at one node (central
    difference), with the attribution's default noise and the model's clean answer."""
    tokens, subject_range = locate_subject(model, PROMPT, SUBJECT)
    drawn, _ = draw_corruption(Gaussian(level=0.3), adapter_for(model),
                                     tokens[0, subject_range[0]:subject_range[1]], samples, 0)
    corrupt = noise_rules.corrupt(drawn.values, subject_range)
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(tokens)
        answer = int(clean_logits[0, -1].argmax())
        with model.hooks(fwd_hooks=[corrupt]):
            _, corrupted = model.run_with_cache(tokens.expand(samples, -1))
    name = NODE[kind].format(site[1])
    index = (slice(None), site[0]) if kind != "head" else (slice(None), site[0], site[2])
    delta = clean[name][0][index[1:]] - corrupted[name][index]

    def run(scale):
        def add(x, hook):
            x[index] += scale * delta
            return x
        with torch.no_grad(), model.hooks(fwd_hooks=[corrupt, (name, add)]):
            log_probs = model(tokens.expand(samples, -1))[:, -1].double().log_softmax(-1)
        return log_probs[:, answer].mean().item()

    return (run(eps) - run(-eps)) / (2 * eps)


@pytest.mark.parametrize("architecture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn", "head"])
def test_estimate_is_the_derivative_on_a_nonlinear_model(architecture, kind, request):
    """Each site's estimate is the derivative of the metric along clean - corrupted
    (checked by central differences at a few sites)."""
    model = request.getfixturevalue(architecture)
    estimate = attribute(model, PROMPT, SUBJECT, kind, samples=2, window=1,
                         noise=Gaussian(level=0.3), steps=1)
    start, end = estimate.subject_range
    sites = [(start + 1, 1), (end - 1, 3), (len(estimate.tokens) - 1, 4)]
    if kind == "head":
        sites = [(t, l, h) for (t, l), h in zip(sites, (0, 2, 3))]
    for site in sites:
        expected = finite_difference(model, kind, site)
        got = float(estimate.scores[site]) - estimate.low_score
        assert got == pytest.approx(expected, abs=2e-3, rel=2e-2), site


def test_head_estimates_add_up_to_the_attention_estimate(tiny_llama):
    """Attention output is the heads' outputs through W_O, so per-head estimates sum to it."""
    heads, attn = attribute_many(tiny_llama, PROMPT, SUBJECT, ["head", "attn"], samples=2,
                                 window=1)
    assert heads.scores.shape == (*attn.scores.shape, tiny_llama.cfg.n_heads)
    torch.testing.assert_close((heads.scores - heads.low_score).sum(-1),
                               attn.scores - attn.low_score, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["tiny_gpt2", "tiny_llama"])
def test_recomputed_queries_keys_values_of_the_clean_stream_are_the_clean_ones(architecture,
                                                                               request):
    model = request.getfixturevalue(architecture)
    tokens, _ = locate_subject(model, PROMPT, SUBJECT)
    _, cache = model.run_with_cache(tokens)
    rotary = "rot_" if model.cfg.positional_embedding_type == "rotary" else ""
    q, k, v = recompute_qkv(model, 3, cache["blocks.3.hook_resid_pre"])
    torch.testing.assert_close(q, cache[f"blocks.3.attn.hook_{rotary}q"])
    torch.testing.assert_close(k, cache[f"blocks.3.attn.hook_{rotary}k"])
    torch.testing.assert_close(v, cache["blocks.3.attn.hook_v"])


@pytest.mark.parametrize("architecture", ["tiny_gpt2", "tiny_llama"])
def test_qk_fix_is_exact_through_the_next_attention_pattern(architecture, request):
    """With the QK fix, a hidden state's estimate at layer l is the derivative of the metric
    along the *exact* changes of block l+1's attention pattern and values (read from a run
    with the state restored) plus the change of the residual stream."""
    model = request.getfixturevalue(architecture)
    samples, layer = 2, 2
    estimate = attribute(model, PROMPT, SUBJECT, "hidden", samples=samples, qk_fix=True,
                         noise=Gaussian(level=0.3))
    tokens, subject_range = locate_subject(model, PROMPT, SUBJECT)
    drawn, _ = draw_corruption(Gaussian(level=0.3), adapter_for(model),
                                     tokens[0, subject_range[0]:subject_range[1]], samples, 0)
    corrupt = noise_rules.corrupt(drawn.values, subject_range)
    block = f"blocks.{layer + 1}"
    names = [f"{block}.attn.hook_pattern", f"{block}.attn.hook_v"]
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens)
        with model.hooks(fwd_hooks=[corrupt]):
            _, corrupted = model.run_with_cache(tokens.expand(samples, -1))
    for token in (subject_range[1] - 1, len(estimate.tokens) - 1):
        node = f"blocks.{layer}.hook_resid_post"
        restore = interventions.restore(node, clean, token)
        with torch.no_grad(), model.hooks(fwd_hooks=[corrupt, restore]):
            _, restored = model.run_with_cache(tokens.expand(samples, -1))
        changes = {name: restored[name] - corrupted[name] for name in names}
        changes[f"{block}.hook_resid_mid"] = torch.zeros_like(corrupted[node])
        changes[f"{block}.hook_resid_mid"][:, token] = clean[node][0, token] - corrupted[node][:, token]

        def run(scale):
            fwd = [corrupt] + [(name, lambda x, hook: x + scale * changes[hook.name])
                               for name in changes]
            with torch.no_grad(), model.hooks(fwd_hooks=fwd):
                log_probs = model(tokens.expand(samples, -1))[:, -1].double().log_softmax(-1)
            return log_probs[:, estimate.answer_token].mean().item()

        expected = (run(1e-2) - run(-1e-2)) / 2e-2
        got = float(estimate.scores[token, layer]) - estimate.low_score
        assert got == pytest.approx(expected, abs=2e-3, rel=2e-2), token


def test_grad_drop_follows_its_definition(tiny_gpt2):
    """sign(plain estimate) x mean over blocks of |estimate with that block's attention and
    MLP cut off from the gradient| (here cut by detaching their normalised inputs); it is
    deprecated, and says so."""
    model, samples = tiny_gpt2, 2
    with pytest.warns(DeprecationWarning, match="grad_drop is deprecated"):
        dropped = attribute_many(model, PROMPT, SUBJECT, ["hidden", "mlp"], samples=samples,
                                 window=1, grad_drop=True)
    plain = attribute_many(model, PROMPT, SUBJECT, ["hidden", "mlp"], samples=samples,
                           window=1, steps=1)
    tokens, subject_range = locate_subject(model, PROMPT, SUBJECT)
    drawn, _ = draw_corruption(Gaussian(), adapter_for(model),
                                     tokens[0, subject_range[0]:subject_range[1]], samples, 0)
    _, clean = model.run_with_cache(tokens)
    names = [NODE[k].format(l) for k in ("hidden", "mlp") for l in range(model.cfg.n_layers)]
    per_block = []
    for cut in range(model.cfg.n_layers):
        kept = {}
        handles = [norm.register_forward_hook(lambda m, i, out: out.detach())
                   for norm in (model.blocks[cut].ln1, model.blocks[cut].ln2)]
        fwd = [corrupt(drawn.values, subject_range)] + [
            (name, lambda x, hook: kept.__setitem__(hook.name, x)) for name in names]
        try:
            with model.hooks(fwd_hooks=fwd):
                log_probs = model(tokens.expand(samples, -1))[:, -1].log_softmax(-1)
        finally:
            for handle in handles:
                handle.remove()
        grads = torch.autograd.grad(log_probs[:, plain[0].answer_token].sum(),
                                    [kept[n] for n in names])
        per_block.append(torch.stack([
            ((clean[n] - kept[n]) * g).sum(-1).mean(0) for n, g in zip(names, grads)]))
    magnitude = torch.stack(per_block).abs().mean(0)  # [name, pos]
    for k, (kind, result, reference) in enumerate(zip(("hidden", "mlp"), dropped, plain)):
        layers = magnitude[k * model.cfg.n_layers:(k + 1) * model.cfg.n_layers].T
        expected = torch.sign(reference.scores - reference.low_score) * layers
        expected[:subject_range[0]] = 0
        torch.testing.assert_close(result.scores - result.low_score, expected, atol=1e-5,
                                   rtol=1e-4)
        # a node in the last layer has no block above it to drop: plain estimate
        torch.testing.assert_close(result.scores[:, -1], reference.scores[:, -1], atol=1e-5,
                                   rtol=1e-5)


def hand_written_head_scores(model, kind_sites, samples=2, level=0.3):
    """The answer's mean log-probability with head h's clean hook_z restored at token t,
    one plain forward pass per site, written with nothing but TransformerLens hooks."""
    tokens, (start, end) = locate_subject(model, PROMPT, SUBJECT)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(samples, end - start, model.cfg.d_model, generator=generator) * level
    _, clean = model.run_with_cache(tokens)
    answer = int(model(tokens)[0, -1].argmax())

    def corrupt(x, hook):
        x[:, start:end] += noise
        return x

    scores = []
    for token, layer, head in kind_sites:
        def restore_head(z, hook, token=token, head=head):
            z[:, token, head] = clean[hook.name][0, token, head]
            return z
        logits = model.run_with_hooks(tokens.expand(samples, -1), fwd_hooks=[
            ("hook_embed", corrupt), (f"blocks.{layer}.attn.hook_z", restore_head)])
        scores.append(logits[:, -1].log_softmax(-1)[:, answer].mean().item())
    return torch.tensor(scores)


@pytest.mark.parametrize("architecture", ["tiny_gpt2", "tiny_llama"])
def test_per_head_restoration_equals_a_hand_written_hook_on_hook_z(architecture, request):
    model = request.getfixturevalue(architecture)
    tokens, (start, end) = locate_subject(model, PROMPT, SUBJECT)
    n_tokens = tokens.shape[1]
    sites = [(t, l, h) for t in (start, end - 1, n_tokens - 1) for l in (0, 3, 5)
             for h in range(model.cfg.n_heads)]
    scores, _, _ = restore_sites(model, PROMPT, SUBJECT, "head", sites, samples=2,
                                 noise=0.3, batch_rows=20)  # several batches
    torch.testing.assert_close(scores, hand_written_head_scores(model, sites), atol=1e-5,
                               rtol=1e-5)


def test_exact_head_trace_equals_a_hand_written_hook_on_hook_z(tiny_llama):
    """``trace(kind="head")``: the exact per-head kind of the tracing engine."""

    result = trace(tiny_llama, PROMPT, SUBJECT, "head", samples=2, noise=0.3,
                           metric="logprob")
    start, end = result.subject_range
    sites = [(t, l, h) for t in (start, end - 1, len(result.tokens) - 1) for l in (0, 5)
             for h in range(tiny_llama.cfg.n_heads)]
    torch.testing.assert_close(torch.stack([result.scores[s] for s in sites]),
                               hand_written_head_scores(tiny_llama, sites), atol=1e-4,
                               rtol=1e-4)


def test_subject_swap_logit_difference_uses_each_samples_corrupted_answer(tiny_llama):
    prompt = "The Eiffel Tower is in the city of"  # the subject tokenizes as on its own
    swap = SubjectSwap(["The Seattle Tower", "Miles Davis Tower"])
    result = attribute(tiny_llama, prompt, SUBJECT, "hidden", samples=2, noise=swap,
                       metric="logit_diff")
    tokens, subject_range = locate_subject(tiny_llama, prompt, SUBJECT)
    drawn = swap.draw(tiny_llama, tokens[0, subject_range[0]:subject_range[1]], 2, None)
    with tiny_llama.hooks(fwd_hooks=[corrupt(drawn.values, subject_range, replace=True)]):
        logits = tiny_llama(tokens.expand(2, -1))[:, -1]
    contrast = logits.clone()
    contrast[:, result.answer_token] = -torch.inf
    contrast = contrast.argmax(-1)
    assert result.contrast_tokens == contrast.tolist()
    assert result.contrast == [tiny_llama.tokenizer.decode([t]) for t in contrast.tolist()]
    expected = (logits[:, result.answer_token] - logits.gather(1, contrast[:, None])[:, 0]).mean()
    assert result.low_score == pytest.approx(expected.item(), abs=1e-4)
    assert "SubjectSwap" in result.noise


@pytest.mark.parametrize("metric", ["logprob", "logit_diff", "prob"])
def test_verify_restores_the_top_sites_exactly(tiny_gpt2, metric):
    estimate = attribute(tiny_gpt2, PROMPT, SUBJECT, "mlp", samples=2, window=3, metric=metric)
    checked = verify(tiny_gpt2, estimate, k=5)
    assert isinstance(checked, Verification)
    assert checked.sites == ranked_sites(estimate)[:5]
    effects = estimate.scores - estimate.low_score
    assert checked.estimated == pytest.approx([float(effects[s]) for s in checked.sites])
    assert checked.estimated == sorted(checked.estimated, reverse=True)
    exact, low, _ = restore_sites(tiny_gpt2, PROMPT, SUBJECT, "mlp", checked.sites, samples=2,
                                  window=3, metric=metric,
                                  contrast=estimate.contrast_tokens)
    assert checked.exact == pytest.approx((exact - low).tolist(), abs=1e-6)
    frame = checked.to_frame()
    assert list(frame.columns) == ["rank", "position", "token", "layer", "estimated", "exact",
                                   "error"]
    assert len(frame) == 5


def test_verify_heads_and_round_trip(tiny_llama, tmp_path):
    estimate = attribute(tiny_llama, PROMPT, SUBJECT, "head", samples=2, noise=0.3)
    checked = verify(tiny_llama, estimate, k=4, noise=0.3, by="magnitude")
    assert all(len(site) == 3 for site in checked.sites)
    assert "head" in checked.to_frame().columns
    expected = hand_written_head_scores(tiny_llama, checked.sites) - checked.low_score
    assert checked.exact == pytest.approx(expected.tolist(), abs=1e-5)
    path = checked.save(tmp_path / "verify.json")
    assert Verification.load(path) == checked
    with pytest.raises(FileExistsError):
        checked.save(path)
    checked.plot().savefig(tmp_path / "verify.png")


def test_verify_refuses_another_noise_rule(tiny_gpt2):
    estimate = attribute(tiny_gpt2, PROMPT, SUBJECT, samples=2)
    with pytest.raises(ValueError, match="pass the same noise"):
        verify(tiny_gpt2, estimate, k=2, noise=Uniform())


def test_spearman_with_ties():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 41])) == \
        pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == \
        pytest.approx(-1.0)
    # ties get average ranks: [1, 2.5, 2.5, 4] against [1, 2, 3, 4]
    assert spearman(torch.tensor([0.0, 1, 1, 2]), torch.tensor([0.0, 1, 2, 3])) == \
        pytest.approx(0.9486833, abs=1e-6)


def test_estimate_has_the_trace_layout(tiny_llama, tmp_path):
    result = attribute(tiny_llama, PROMPT, SUBJECT, "attn", samples=2, window=3)
    assert result.method == "attribution" and result.window == 3
    assert result.scores.shape == (len(result.tokens), tiny_llama.cfg.n_layers)
    start = result.subject_range[0]
    assert torch.all(result.scores[:start] == result.low_score)
    assert (result.seed, result.contrast, result.contrast_tokens) == (0, None, None)
    assert result.meta == {"qk_fix": False, "grad_drop": False, "steps": DEFAULT_STEPS}
    loaded = TraceResult.load(result.save(tmp_path / "estimate.json"))
    assert torch.equal(loaded.scores, result.scores) and loaded.meta == result.meta
    assert loaded.method == "attribution"


def test_corruption_is_the_deprecated_name_of_noise(tiny_gpt2):
    estimate = attribute(tiny_gpt2, PROMPT, SUBJECT, samples=2, noise=0.3)
    with pytest.warns(DeprecationWarning, match=r"corruption=.*deprecated.*noise="):
        old = attribute(tiny_gpt2, PROMPT, SUBJECT, samples=2, corruption=0.3)
    assert torch.equal(old.scores, estimate.scores) and old.noise == estimate.noise
    with pytest.warns(DeprecationWarning, match=r"verify\(corruption="):
        checked = verify(tiny_gpt2, estimate, k=2, corruption=0.3)
    assert checked.exact == verify(tiny_gpt2, estimate, k=2, noise=0.3).exact
    with pytest.warns(DeprecationWarning, match=r"restore_sites\(corruption="):
        scores, _, _ = restore_sites(tiny_gpt2, PROMPT, SUBJECT, "hidden", [(1, 2)], samples=2,
                                     corruption=0.3)
    assert torch.equal(scores, restore_sites(tiny_gpt2, PROMPT, SUBJECT, "hidden", [(1, 2)],
                                             samples=2, noise=0.3)[0])
    with pytest.raises(InputError, match="both noise= and corruption="):
        attribute(tiny_gpt2, PROMPT, SUBJECT, samples=2, noise=0.3, corruption=0.3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="neurons"), "unknown kind 'neurons'"),
        (dict(metric="kl"), "unknown metric 'kl'"),
        (dict(samples=0), "samples must be an integer >= 1"),
        (dict(contrast=" Rome"), "contrast applies to metric='logit_diff' only"),
        (dict(metric="logit_diff", target=" Paris", contrast=" Paris"), "the answer itself"),
    ],
)
def test_bad_input_is_named(tiny_gpt2, kwargs, message):
    with pytest.raises(ValueError, match=message):
        attribute(tiny_gpt2, PROMPT, SUBJECT, **{"samples": 2, **kwargs})


def test_bad_sites_are_named(tiny_gpt2):
    with pytest.raises(ValueError, match=r"site \(1, 2\) must be 3 integers"):
        restore_sites(tiny_gpt2, PROMPT, SUBJECT, "head", [(1, 2)], samples=2)
    with pytest.raises(ValueError, match="out of range"):
        restore_sites(tiny_gpt2, PROMPT, SUBJECT, "hidden", [(1, 99)], samples=2)
