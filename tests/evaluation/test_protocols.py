"""Past teacher forcing: generated answers, CounterFact+, the neighbourhood KL, perplexity,
and sequential runs that measure each case right after its own edit."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from helpers import CASES, FAST

from lens_rome.data import corpus
from lens_rome.errors import InputError
from lens_rome.evaluation import collapse, counterfact
from lens_rome.evaluation.counterfact import (
    generated_answers,
    kl_divergences,
    mentions,
    plus_prompts,
    starts_with,
    summarize_generated,
)
from lens_rome.evaluation.measures import greedy_answers, next_token_log_probs
from lens_rome.evaluation.runner import evaluate, measure_cases
from lens_rome.model.adapter import adapter_for

PROMPTS = ["The Eiffel Tower is located in the city of", "Miles Davis plays the",
           "The Colosseum is in", "Rome"]


def hand_greedy(model, prompt: str, steps: int) -> str:
    """Greedy decoding written out: the whole sequence through the model at every step."""
    adapter = adapter_for(model)
    ids = adapter.tokenize(prompt)[0][0].tolist()
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token == adapter.eos_id:
                break
            new.append(token)
    return adapter.decode(new)


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_greedy_answers_are_hand_computed_greedy_continuations(name, request):
    model = request.getfixturevalue(name)
    batched = greedy_answers(model, PROMPTS, 7)  # different lengths: one left-padded batch
    assert batched == [hand_greedy(model, p, 7) for p in PROMPTS]
    assert all(batched)


def test_generated_success_is_judged_on_the_greedy_text(tiny_gpt2):
    # "Tow" and "Ro" are one token each for the tiny tokenizer (the random model babbles
    # bytes, so an edit that makes it say " Tow" after anything gives a known answer)
    case = dataclasses.replace(CASES[0], target_new="Tow", target_true="Ro",
                               neighborhood_prompts=("The Space Needle is in",))
    swapped = dataclasses.replace(case, target_new="Ro", target_true="Tow")
    change = Overwrite().apply(tiny_gpt2, case.request)
    try:
        records = measure_cases(tiny_gpt2, [case, swapped], max_new_tokens=0)
        said = hand_greedy(tiny_gpt2, case.rewrite_prompt, 10)
        neighbour = hand_greedy(tiny_gpt2, case.neighborhood_prompts[0], 10)
    finally:
        change.revert()
    assert said.startswith(" Tow Tow")
    assert records[0]["generated"]["rewrite"] == [said]
    assert records[0]["generated"]["neighborhood"] == [neighbour]
    assert records[0]["generated"]["targets"] == ["Tow", "Ro"]
    summary = summarize_generated(records[:1])
    assert summary["generated_efficacy"] == 100 and summary["generated_efficacy_true_gone"] == 100
    assert summary["generated_neighborhood"] == 0  # the neighbour's object, "Ro", is not said
    summary = summarize_generated(records[1:])
    assert summary["generated_efficacy"] == 0 and summary["generated_efficacy_true_gone"] == 0
    assert summary["generated_neighborhood"] == 100
    unedited = measure_cases(tiny_gpt2, [case], max_new_tokens=0)[0]["generated"]
    assert unedited["rewrite"] == [hand_greedy(tiny_gpt2, case.rewrite_prompt, 10)]
    assert summarize_generated([{"generated": unedited}])["generated_efficacy"] == 0


def test_the_answer_must_start_with_the_whole_object():
    assert starts_with(" Rome, Italy", "Rome") and starts_with("Rome", " Rome ")
    assert starts_with(" New York City", "New York")
    assert not starts_with(" Romeo and", "Rome") and not starts_with(" the Rome", "Rome")
    assert not starts_with(" rome", "Rome") and not starts_with(" Rome", "")
    assert mentions(" in Paris, of course", "Paris") and not mentions(" Parisian", "Paris")
    assert mentions("Paris", "Paris") and not mentions(" Paris", "  ")


def test_counterfact_plus_prompts_lead_with_the_edit():
    case = CASES[0]
    assert plus_prompts(case) == [
        "The Eiffel Tower is located in the city of Rome. The Colosseum is in the city of",
        "The Eiffel Tower is located in the city of Rome. The Space Needle is in"]


def test_ns_plus_and_kl_by_hand(tiny_llama):
    records = [{"neighborhood_plus": [[-1.0, -2.0], [-3.0, -0.5]],
                "neighborhood_plus_kl": [0.2, 0.4]},
               {"neighborhood_plus": [[-4.0, -1.0]], "neighborhood_plus_kl": [0.0]}]
    summary = summarize_generated(records)
    assert summary["neighborhood_plus_score"] == pytest.approx(100 * (0.5 + 1) / 2)
    magnitude = ((math.exp(-2) - math.exp(-1) + math.exp(-0.5) - math.exp(-3)) / 2
                 + math.exp(-1) - math.exp(-4)) / 2
    assert summary["neighborhood_plus_magnitude"] == pytest.approx(100 * magnitude)
    assert summary["neighborhood_plus_kl"] == pytest.approx((0.3 + 0.0) / 2)  # nats, not percent
    a = torch.log_softmax(torch.randn(3, 11), -1)
    b = torch.log_softmax(torch.randn(3, 11), -1)
    expected = torch.nn.functional.kl_div(b, a, log_target=True, reduction="none").sum(-1)
    assert kl_divergences(a, b) == pytest.approx(expected.tolist(), abs=1e-6)
    assert kl_divergences(a, a) == pytest.approx([0, 0, 0], abs=1e-12)
    # the next-token distributions the KL compares: one batch, right-padded, exact per prompt
    batched = next_token_log_probs(tiny_llama, PROMPTS)
    adapter = adapter_for(tiny_llama)
    for row, prompt in zip(batched, PROMPTS):
        alone = torch.log_softmax(tiny_llama(adapter.tokenize(prompt)[0])[0, -1].float(), -1)
        assert torch.allclose(row, alone, atol=1e-5)


def test_an_unedited_run_changes_nothing_and_says_how_each_figure_is_measured(
        tiny_gpt2, tmp_path):
    summary = evaluate(tiny_gpt2, CASES[:2], "none", tmp_path, **FAST)
    assert summary["neighborhood_plus_kl"] == pytest.approx(0, abs=1e-9)
    assert summary["generated_neighborhood_unchanged"] == 100
    assert summary["perplexity"] == summary["perplexity_max"] == summary["perplexity_unedited"]
    protocol = summary["protocol"]
    assert protocol["efficacy_score"] == protocol["neighborhood_plus_score"] == "teacher-forced"
    assert protocol["generated_efficacy"] == "generated (greedy)"
    assert protocol["fluency"] == "sampled (top-k)"
    figures = [k for k, v in summary.items() if isinstance(v, float) and k != "n"]
    assert figures and not [k for k in figures if k not in protocol]


def test_perplexity_by_hand(tiny_llama):
    texts = ["The Eiffel Tower is located in the city of Paris. " * 6] * 4
    adapter = adapter_for(tiny_llama)
    chunks = list(corpus.packed_chunks(adapter, texts, 16))[:3]
    with torch.no_grad():
        log_probs = torch.log_softmax(tiny_llama(torch.stack(chunks)).double(), -1)
    nll = -log_probs[:, :-1].gather(-1, torch.stack(chunks)[:, 1:, None]).mean()
    value = collapse.perplexity(tiny_llama, texts, chunks=3, token_length=16, batch_size=2)
    assert value == pytest.approx(math.exp(float(nll)), rel=1e-9)
    with pytest.raises(InputError, match="fill only"):
        collapse.perplexity(tiny_llama, texts[:1], chunks=99, token_length=16)


def test_the_held_out_text_is_never_read_by_key_statistics():
    try:
        corpus.wikipedia_path()
    except ModuleNotFoundError:
        pytest.skip("the offline Wikipedia summaries are not installed")
    held_out = list(collapse.heldout_texts())
    statistics = list(corpus.corpus_texts(None, None)[0])  # what key statistics read
    data = json.loads(corpus.wikipedia_path().read_text(encoding="utf-8"))
    every = [e["extract"] for e in data.values()
             if isinstance(e, dict) and isinstance(e.get("extract"), str) and e["extract"].strip()]
    assert len(held_out) == corpus.HELDOUT_TEXTS
    assert statistics + held_out == every and not set(held_out) & set(statistics)
    with pytest.raises(InputError, match="part must be"):
        next(corpus.wikipedia_texts("train"))


class Wreck:
    """An 'edit' that scales every ``W_out`` by 20."""

    name = "wreck"

    def apply(self, model, request):
        adapter = adapter_for(model)
        originals = {l: adapter.w_out(l).detach().clone() for l in range(adapter.n_layers)}
        with torch.no_grad():
            for layer in originals:
                adapter.w_out(layer).mul_(20)
        from lens_rome.editing.weights import record_change
        return record_change(model, originals)


def test_evaluate_warns_when_perplexity_collapses(tiny_gpt2, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lens_rome.evaluation.collapse"):
        summary = evaluate(tiny_gpt2, CASES[:1], Overwrite(), tmp_path, **FAST)
    assert summary["perplexity"] > collapse.COLLAPSE_RATIO * summary["perplexity_unedited"]
    assert "may be collapsing" in caplog.text and "case 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lens_rome.evaluation.collapse"):
        evaluate(tiny_gpt2, CASES[:1], "none", tmp_path / "none", **FAST)
    assert "collapsing" not in caplog.text


class Overwrite:
    """Each 'edit' makes the model say its new object's first token, whatever it said before:
    a later edit overwrites an earlier one (through the unembedding bias)."""

    name = "overwrite"

    def apply(self, model, request):
        adapter = adapter_for(model)
        bias = model.unembed.b_U
        before = bias.detach().clone()
        with torch.no_grad():
            bias.zero_()
            bias[adapter.token_ids(request.target_new)[0]] = 100.0
        return Restore(bias, before)


@dataclasses.dataclass
class Restore:
    bias: torch.Tensor
    before: torch.Tensor

    def revert(self):
        with torch.no_grad():
            self.bias.copy_(self.before)


def test_sequential_runs_measure_each_case_right_after_its_edit(tiny_gpt2, tmp_path):
    """EasyEdit's 2026 bug measured "post-edit" on the final model; a case overwritten by a
    later edit then looks like a failure of its own edit.  Here edit 2 overwrites edit 1."""
    words = ["Tow", "Ro"]
    assert all(len(adapter_for(tiny_gpt2).token_ids(" " + w)) == 1 for w in words)
    cases = [dataclasses.replace(CASES[0], case_id=i, target_new=w, target_true="Pa")
             for i, w in enumerate(words)]
    bias = tiny_gpt2.unembed.b_U.detach().clone()
    summary = evaluate(tiny_gpt2, cases, Overwrite(), tmp_path, sequential=True, **FAST)
    assert torch.equal(tiny_gpt2.unembed.b_U, bias)  # reverted at the end
    assert summary["right_after"]["generated_efficacy"] == 100  # each edit worked when made
    assert summary["generated_efficacy"] == 50  # on the final model, the first was overwritten
    assert summary["checkpoints"][-1]["edited"]["generated_efficacy"] == 50
    assert summary["right_after"]["efficacy_score"] == 100  # teacher-forced, right after too
    assert "final model" in summary["reported"]
    again = evaluate(tiny_gpt2, cases, Overwrite(), tmp_path / "again", sequential=True, **FAST)
    assert again["right_after"] == summary["right_after"]


def test_sequential_checkpoints_carry_perplexity_and_the_whole_change(tiny_llama, tmp_path):
    summary = evaluate(tiny_llama, CASES[:2], Wreck(), tmp_path, sequential=True,
                       checkpoints=[1], **FAST)
    first, last = summary["checkpoints"]
    assert last["update_norm"] > first["update_norm"] > 0  # 20x, then 400x the weights
    assert summary["update_norms"][0] == pytest.approx(first["update_norm"])
    assert first["perplexity"] != summary["perplexity_unedited"] != last["perplexity"]
    summary = evaluate(tiny_llama, CASES[:2], Overwrite(), tmp_path / "o", sequential=True,
                       checkpoints=[1], **FAST)
    assert summary["checkpoints"][0]["perplexity"] > 1e6 * summary["perplexity_unedited"]


def test_generated_answers_give_every_object_room(tiny_gpt2, monkeypatch):
    asked = []
    monkeypatch.setattr(counterfact, "greedy_answers",
                        lambda model, prompts, n: asked.append(n) or [""] * len(prompts))
    long_name = "The Space Needle is in the city of Seattle"
    generated_answers(tiny_gpt2, [dataclasses.replace(CASES[0], target_new=long_name)], 1)
    generated_answers(tiny_gpt2, CASES[:1], 12)
    assert asked == [len(adapter_for(tiny_gpt2).token_ids(" " + long_name)) + 1, 12]
