"""trace(): subject location, results, bad input, and the embedded model's behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from lens_rome.errors import SavedFileError
from lens_rome.tracing.engine import trace
from lens_rome.tracing.noise_rules import Gaussian, SubjectSwap
from lens_rome.tracing.result import TraceResult
from lens_rome.tracing.subject import locate_subject

PROMPT = "The Space Needle is in downtown"
SUBJECT = "The Space Needle"


@pytest.mark.parametrize("subject", ["Eiffel", "The Eiffel Tower", "iffel Tow", "Tower?"])
def test_subject_is_located_by_character_offsets(tiny_gpt2, subject):
    """The subject's tokens are the fewest consecutive tokens whose text covers it, even
    when its edges fall inside a token."""
    prompt = "Where is The Eiffel Tower? It is in"
    tokens, (start, end) = locate_subject(tiny_gpt2, prompt, subject)
    pieces = [tiny_gpt2.tokenizer.decode([t]) for t in tokens[0, start:end]]
    assert subject in "".join(pieces)
    assert subject not in "".join(pieces[1:]) and subject not in "".join(pieces[:-1])


def test_result_shapes_and_effects(tiny_llama):
    result = trace(tiny_llama, PROMPT, SUBJECT, "mlp", samples=2, window=3)
    n_tokens = len(result.tokens)
    assert result.scores.shape == (n_tokens, tiny_llama.cfg.n_layers)
    assert result.subject_range[0] == 0
    assert result.total_effect == pytest.approx(result.high_score - result.low_score)
    assert torch.allclose(result.indirect_effect, result.scores - result.low_score)
    frame = result.to_frame()
    assert len(frame) == n_tokens * tiny_llama.cfg.n_layers
    assert set(frame.columns) >= {"position", "token", "is_subject", "layer", "score"}
    assert frame.is_subject.sum() == (result.subject_range[1] - result.subject_range[0]) * 6
    # Restoring every state at the last token after the last layer gives the clean run back.
    hidden = trace(tiny_llama, PROMPT, SUBJECT, "hidden", samples=2)
    assert hidden.scores[-1, -1].item() == pytest.approx(hidden.high_score, abs=1e-5)


def test_tokens_before_the_subject_keep_the_corrupted_score(tiny_gpt2):
    result = trace(tiny_gpt2, "Where is The Eiffel Tower? It is in", "Eiffel Tower",
                   samples=2)
    start = result.subject_range[0]
    assert start > 0
    assert torch.all(result.scores[:start] == result.low_score)


def test_same_seed_same_scores_and_target(tiny_llama):
    first = trace(tiny_llama, PROMPT, SUBJECT, samples=2, seed=3)
    again = trace(tiny_llama, PROMPT, SUBJECT, samples=2, seed=3)
    other = trace(tiny_llama, PROMPT, SUBJECT, samples=2, seed=4)
    assert torch.equal(first.scores, again.scores)
    assert not torch.equal(first.scores, other.scores)
    targeted = trace(tiny_llama, PROMPT, SUBJECT, samples=2, seed=3, target=first.answer)
    assert torch.equal(targeted.scores, first.scores)


def test_noise_rules_run(tiny_gpt2):
    from lens_rome.tracing.noise_rules import (
        MultivariateGaussian,
        Replacement,
        StudentT,
        Uniform,
    )

    for rule in [Gaussian(), Gaussian(level=0.5), StudentT(), Uniform(), MultivariateGaussian(),
                 Replacement(), 0.2]:
        result = trace(tiny_gpt2, PROMPT, SUBJECT, samples=2, noise=rule)
        assert torch.isfinite(result.scores).all(), rule


def test_subject_swap_needs_equal_length(tiny_gpt2):
    n_subject = (lambda r: r[1] - r[0])(locate_subject(tiny_gpt2, PROMPT, SUBJECT)[1])
    with pytest.raises(ValueError, match="alternative subject 'x' has 1 tokens"):
        trace(tiny_gpt2, PROMPT, SUBJECT, samples=2, noise=SubjectSwap(["x"] if n_subject != 1 else ["xx yy zz"]))


def test_save_and_load_round_trip(tiny_llama, tmp_path):
    result = trace(tiny_llama, PROMPT, SUBJECT, "attn", samples=2, window=2, sever=None)
    path = result.save(tmp_path / "trace.json")
    loaded = TraceResult.load(path)
    assert torch.equal(loaded.scores, result.scores)
    assert loaded.subject_range == result.subject_range and loaded.tokens == result.tokens
    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.save(path)
    result.save(path, overwrite=True)
    assert (loaded.method, loaded.seed, loaded.contrast, loaded.contrast_tokens) == (
        "exact", 0, None, None)
    assert loaded.meta == result.meta and "seed" not in loaded.meta
    path.write_text('{"scores": [1, 2')
    with pytest.raises(SavedFileError, match="not a readable lens_rome trace result"):
        TraceResult.load(path)


FIRST_FORMAT = {  # as lens_rome wrote results before method, seed and contrast were fields
    "scores": [[0.1, 0.2], [0.3, 0.4]], "low_score": 0.1, "high_score": 0.5, "answer": " Paris",
    "answer_token": 7, "tokens": ["The", " Tower"], "subject_range": [0, 1], "kind": "hidden",
    "window": 1, "prompt": "The Tower", "subject": "The", "samples": 2, "sever": None,
    "noise": "Gaussian(scale=3.0, level=None)", "model_name": "tiny", "format": 1,
}


@pytest.mark.parametrize("meta, fields, kept", [
    ({"seed": 4, "bf16": False, "precision": "float32", "blocks": "transformer_lens"},
     ("exact", 4, None, None), {"bf16": False, "precision": "float32", "blocks": "transformer_lens"}),
    ({"method": "attribution", "seed": 2, "qk_fix": True, "grad_drop": False,
      "contrast": [" Rome", " Rome"], "contrast_tokens": [9, 9]},
     ("attribution", 2, [" Rome", " Rome"], [9, 9]), {"qk_fix": True, "grad_drop": False}),
])
def test_results_of_the_first_format_still_load(tmp_path, meta, fields, kept):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**FIRST_FORMAT, "metric": "logit_diff", "meta": meta}))
    loaded = TraceResult.load(path)
    assert (loaded.method, loaded.seed, loaded.contrast, loaded.contrast_tokens) == fields
    assert loaded.meta == kept and loaded.scores.shape == (2, 2)
    rewritten = loaded.save(tmp_path / "new.json")
    saved = json.loads(rewritten.read_text())
    assert saved["format"] == 2 and saved["seed"] == fields[1] and "seed" not in saved["meta"]
    assert TraceResult.load(rewritten).to_dict() == loaded.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(subject="Eiffel Tower"), "subject 'Eiffel Tower' does not occur in prompt"),
        (dict(prompt=""), "prompt must be a non-empty string"),
        (dict(subject=""), "subject must be a non-empty string"),
        (dict(samples=0), "samples must be an integer >= 1, got 0"),
        (dict(window=0), "window must be an integer >= 1, got 0"),
        (dict(kind="mlps"), "unknown kind 'mlps'; expected one of \\['hidden', 'mlp', 'attn', "
                            "'head'\\]"),
        (dict(metric="logit"), "unknown metric 'logit'"),
        (dict(sever="embed"), "sever must be None, 'mlp' or 'attn'"),
        (dict(kind="mlp", sever="mlp"), "sever applies to hidden-state traces"),
        (dict(target=""), "target must be a non-empty string"),
        (dict(noise=-1.0), "noise level must be a finite number >= 0"),
        (dict(noise=float("nan")), "noise level must be a finite number >= 0 .*, got nan"),
        (dict(noise=float("inf")), "noise level must be a finite number >= 0 .*, got inf"),
        (dict(noise=Gaussian(scale=float("nan"))), "noise rule .* drew NaN or infinite values"),
        (dict(prompt=SUBJECT + " is" + " in Seattle" * 40),
         "prompt 'The Space Needle is in Seattle.* is [0-9]+ tokens long, but tiny accepts at "
         "most 64 tokens \\(its context length\\); shorten it by [0-9]+ tokens"),
        (dict(noise=torch.zeros(2, 1, 64)), "noise tensor has shape \\(2, 1, 64\\); expected"),
    ],
)
def test_bad_input_is_named(tiny_gpt2, kwargs, message):
    arguments = dict(prompt=PROMPT, subject=SUBJECT, samples=2) | kwargs
    with pytest.raises(ValueError, match=message):
        trace(tiny_gpt2, arguments.pop("prompt"), arguments.pop("subject"), **arguments)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_noise_tensor_must_be_finite(tiny_gpt2, bad):
    _, (start, end) = locate_subject(tiny_gpt2, PROMPT, SUBJECT)
    noise = torch.randn(2, end - start, 64)
    noise[1, 0, 5] = bad
    with pytest.raises(ValueError, match="noise tensor has 1 NaN or infinite values of"):
        trace(tiny_gpt2, PROMPT, SUBJECT, samples=2, noise=noise)


def test_noise_of_wrong_type(tiny_gpt2):
    with pytest.raises(TypeError, match="noise must be a float level, a tensor"):
        trace(tiny_gpt2, PROMPT, SUBJECT, noise="s3")


def _answered(model, facts, limit):
    """Facts whose expected attribute starts the model's greedy answer."""
    chosen = []
    for fact in facts:
        tokens = model.to_tokens(fact["prompt"], prepend_bos=False)
        with torch.no_grad():
            top = model.tokenizer.decode(model(tokens)[0, -1].argmax())
        if top.strip() and fact["attribute"].startswith(top.strip()):
            chosen.append(fact)
        if len(chosen) == limit:
            break
    return chosen


@pytest.mark.embedded
def test_smollm_recalls_facts_at_the_subject_then_at_the_last_token(smollm, known_facts):
    """The paper's two sites: an early site at the subject in early/middle layers, a late
    site at the last token in late layers, each recovering at least half the clean score."""
    facts = _answered(smollm, known_facts, limit=3)
    assert len(facts) == 3
    n_layers = smollm.cfg.n_layers
    for fact in facts:
        tokens, (start, end) = locate_subject(smollm, fact["prompt"], fact["subject"])
        n_tokens = tokens.shape[-1]
        # only the rows asserted on are restored (the others would be NaN)
        result = trace(smollm, fact["prompt"], fact["subject"], "hidden", samples=5,
                       positions=[*range(start, end), n_tokens - 1])
        assert result.subject_range == (start, end)
        early = result.scores[start:end, : 2 * n_layers // 3].max().item()
        # The last layer itself is excluded: restoring it there gives the clean run back.
        late = result.scores[-1, n_layers // 2 : n_layers - 2].max().item()
        assert early >= 0.5 * result.high_score, (fact["prompt"], early, result.high_score)
        assert late >= 0.5 * result.high_score, (fact["prompt"], late, result.high_score)
        assert result.low_score < 0.5 * result.high_score  # the corruption did remove the fact
