"""CounterFact past teacher forcing: generated answers, CounterFact+ and the neighbourhood KL.

Teacher-forced scores compare ``P(o*)`` with ``P(o)``; a model can prefer
``o*`` there and still not say it ("The Mirage of Model Editing", ACL 2025).
The generated protocol lets the model answer: the greedy continuation of each
prompt (at most ``answer_tokens`` tokens, and always a token more than the
longer object), judged as text:

- generated efficacy / paraphrase: the continuation starts with ``o*``
  (after leading spaces; the next character, if any, not a letter or digit, so
  ``"Rome"`` does not match ``"Romeo"``); ``_true_gone``: ``o`` appears nowhere
  in it (as a whole word);
- generated neighbourhood: a neighbourhood continuation starts with the
  neighbour's true object ``o``; ``_unchanged``: it is the unedited model's
  continuation, character for character.

CounterFact+ (Hoelscher-Obermaier et al., Findings ACL 2023): each
neighbourhood prompt is prefixed with the rewrite prompt and its new object
(``"The Eiffel Tower is located in Rome. The Louvre is located in"``), which
tempts an editor that keys on the object rather than the subject.  NS+ is the
neighbourhood score on those prompts (teacher-forced); the neighbourhood KL is
``KL(unedited || edited)`` of the next-token distribution after each of them,
averaged over a case's prompts, then over cases.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import torch

from lens_rome.data.cases import CounterFactCase
from lens_rome.evaluation.measures import greedy_answers, probabilities
from lens_rome.evaluation.text import harmonic_mean
from lens_rome.model.adapter import adapter_for
from lens_rome.model.backend import Model

DEFAULT_ANSWER_TOKENS = 10  # greedy tokens per prompt in the generated protocol
GENERATED_KEYS = ("generated_score", "generated_efficacy", "generated_efficacy_true_gone",
                  "generated_paraphrase", "generated_paraphrase_true_gone",
                  "generated_neighborhood", "generated_neighborhood_unchanged")
PLUS_KEYS = ("neighborhood_plus_score", "neighborhood_plus_magnitude", "neighborhood_plus_kl")


def plus_prompts(case: CounterFactCase) -> list[str]:
    """CounterFact+'s neighbourhood prompts: ``"<rewrite prompt> <o*>. <neighbourhood prompt>"``."""
    return [f"{case.rewrite_prompt} {case.target_new.strip()}. {prompt}"
            for prompt in case.neighborhood_prompts]


def starts_with(text: str, answer: str) -> bool:
    """Whether ``text`` (leading spaces dropped) begins with the word(s) ``answer``."""
    text, answer = text.lstrip(), answer.strip()
    return bool(answer) and text.startswith(answer) and not text[len(answer):][:1].isalnum()


def mentions(text: str, answer: str) -> bool:
    """Whether ``answer`` appears in ``text`` as whole word(s)."""
    answer = answer.strip()
    return bool(answer) and re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text) is not None


def generated_answers(model: Model, cases: Sequence[CounterFactCase],
                      answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> list[dict]:
    """Per case, the greedy continuations of its rewrite, paraphrase and neighbourhood prompts
    and the two objects they are judged against (a record's ``"generated"`` entry).

    All the cases' prompts run together (:func:`greedy_answers`), for the length the
    longest object of any case needs.
    """
    adapter = adapter_for(model)
    longest = max((len(adapter.token_ids(" " + t.strip())) for c in cases
                   for t in (c.target_new, c.target_true)), default=0)
    prompts = [(c.rewrite_prompt, *c.paraphrase_prompts, *c.neighborhood_prompts)
               for c in cases]
    texts = iter(greedy_answers(model, [p for ps in prompts for p in ps],
                                max(answer_tokens, longest + 1)))
    out = []
    for case in cases:
        rewrite = [next(texts)]
        paraphrase = [next(texts) for _ in case.paraphrase_prompts]
        neighborhood = [next(texts) for _ in case.neighborhood_prompts]
        out.append({"rewrite": rewrite, "paraphrase": paraphrase, "neighborhood": neighborhood,
                    "targets": [case.target_new.strip(), case.target_true.strip()]})
    return out


def kl_divergences(unedited: torch.Tensor, edited: torch.Tensor) -> list[float]:
    """``KL(unedited || edited)`` per row of two ``[n, d_vocab]`` log-probability tensors."""
    unedited, edited = unedited.double(), edited.double()
    return (unedited.exp() * (unedited - edited)).sum(-1).clamp_min(0).tolist()


def summarize_generated(records: Sequence[Mapping]) -> dict:
    """The generated protocol's and CounterFact+'s figures (percent; KL in nats) over records.

    A record without a measure (older runs; the KL in sequential runs) leaves its
    figure None.  ``generated_neighborhood_unchanged`` needs each record's
    ``neighborhood_unedited`` continuations.
    """
    def mean(values: Sequence[float], scale: float = 100) -> float | None:
        kept = [v for v in values if v is not None and not np.isnan(v)]
        return scale * float(np.mean(kept)) if kept else None

    per_case: dict[str, list[float]] = {key: [] for key in GENERATED_KEYS + PLUS_KEYS}
    for record in records:
        made = record.get("generated")
        if made:
            new, true = made["targets"]
            for part, key in (("rewrite", "efficacy"), ("paraphrase", "paraphrase")):
                texts = made[part]
                per_case[f"generated_{key}"].append(
                    np.mean([starts_with(t, new) for t in texts]) if texts else np.nan)
                per_case[f"generated_{key}_true_gone"].append(
                    np.mean([not mentions(t, true) for t in texts]) if texts else np.nan)
            texts = made["neighborhood"]
            per_case["generated_neighborhood"].append(
                np.mean([starts_with(t, true) for t in texts]) if texts else np.nan)
            before = record.get("neighborhood_unedited")
            per_case["generated_neighborhood_unchanged"].append(
                np.mean([a == b for a, b in zip(texts, before)])
                if before is not None and texts else np.nan)
        pairs = np.asarray(record.get("neighborhood_plus") or [], dtype=float).reshape(-1, 2)
        if len(pairs):
            per_case["neighborhood_plus_score"].append(np.mean(pairs[:, 1] > pairs[:, 0]))
            probs = probabilities(pairs)
            per_case["neighborhood_plus_magnitude"].append(np.mean(probs[:, 1] - probs[:, 0]))
        kl = record.get("neighborhood_plus_kl")
        if kl:
            per_case["neighborhood_plus_kl"].append(float(np.mean(kl)))
    summary = {key: mean(values, 1 if key.endswith("_kl") else 100)
               for key, values in per_case.items()}
    parts = [summary[f"generated_{k}"] for k in ("efficacy", "paraphrase", "neighborhood")]
    summary["generated_score"] = None if None in parts else harmonic_mean(parts)
    return {key: summary[key] for key in GENERATED_KEYS + PLUS_KEYS}
