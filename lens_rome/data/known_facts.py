"""The paper's known facts, and CounterFact-format cases built from them."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lens_rome.checks import positive_int
from lens_rome.data.cases import CounterFactCase, read_records
from lens_rome.data.requests import fill
from lens_rome.errors import InputError
from lens_rome.model.adapter import adapter_for

log = logging.getLogger(__name__)

KNOWN_FACT_KEYS = ("known_id", "subject", "attribute", "prompt")


def load_known_facts(source: str | Path | Sequence[Mapping], *,
                     require: Sequence[str] = KNOWN_FACT_KEYS) -> list[dict]:
    """Known facts (the paper's ``known_1000.json`` format) from a file or a list, checked.

    Each record needs the keys in ``require``: ``known_id`` a unique integer,
    the others non-empty strings, and ``prompt`` must contain ``subject``.
    """
    records, where = read_records(source, "known-facts")
    facts, seen = [], set()
    for i, fact in enumerate(records):
        if not isinstance(fact, Mapping):
            raise InputError(f"fact {i} of {where} must be a JSON object, got {fact!r:.80}")
        name = f"fact {fact.get('known_id', i)} of {where}"
        for key in require:
            if key not in fact:
                raise InputError(f"{name} lacks {key!r}; known facts have keys "
                                 f"{list(dict.fromkeys([*KNOWN_FACT_KEYS, *require]))}")
        known_id = fact["known_id"]
        if isinstance(known_id, bool) or not isinstance(known_id, int):
            raise InputError(f"{name}: known_id must be an integer, got {known_id!r}")
        for key in require:
            if key != "known_id" and (not isinstance(fact[key], str) or not fact[key].strip()):
                raise InputError(f"{name}: {key} must be a non-empty string, got {fact[key]!r}")
        if fact["subject"] not in fact["prompt"]:
            raise InputError(f"fact {known_id}: subject {fact['subject']!r} is not in "
                             f"its prompt {fact['prompt']!r}")
        if known_id in seen:
            raise InputError(f"fact {known_id}: known_id appears more than once in {where}")
        seen.add(known_id)
        facts.append(dict(fact))
    return facts


@torch.no_grad()
def answered_correctly(model, facts: Sequence[Mapping], batch_size: int = 32) -> list[Mapping]:
    """The facts whose object's first token (``" " + attribute``) is the model's top next token."""
    adapter = adapter_for(model)
    pad = adapter.pad_id
    good = []
    for i in range(0, len(facts), batch_size):
        chunk = facts[i:i + batch_size]
        rows = [adapter.tokenize(f["prompt"])[0][0].tolist() for f in chunk]
        width = max(map(len, rows))
        logits = model(adapter.as_tokens([r + [pad] * (width - len(r)) for r in rows]))
        for j, (fact, row) in enumerate(zip(chunk, rows)):  # right padding: exact
            first = adapter.token_ids(" " + fact["attribute"])[0]
            if int(logits[j, len(row) - 1].argmax()) == first:
                good.append(fact)
    return good


def build_counterfact(
    known_facts: str | Path | Sequence[Mapping],
    model=None,
    *,
    n: int | None = None,
    seed: int = 0,
    only_correct: bool | None = None,
    max_prompts: int = 10,
    generation_prompts: int = 2,
) -> list[CounterFactCase]:
    """CounterFact-format cases from known facts (``{known_id, subject, attribute, prompt,
    relation_id, ...}``), the same for the same ``seed``.

    For each fact (in a seeded random order; ``case_id`` is its ``known_id``):

    - ``target_new``: the object of another fact of the same relation, drawn at random;
    - paraphrase prompts: the subject in the relation's other prompt templates
      (each fact's prompt with its subject taken out);
    - neighbourhood prompts: other subjects' prompts with the same relation and object;
    - attribute prompts: prompts of subjects whose true object is ``target_new``;
    - generation prompts: ``generation_prompts`` of the rewrite and paraphrase prompts.

    A fact without paraphrases or neighbours is skipped.  With a ``model``,
    only facts it answers correctly are used (``only_correct``, default True
    when a model is given).  At most ``max_prompts`` prompts of each kind;
    ``n`` cases at most.
    """
    if only_correct is None:
        only_correct = model is not None
    if only_correct and model is None:
        raise InputError("only_correct=True needs the model whose answers are checked; "
                         "pass model=... or only_correct=False")
    for name, value in (("max_prompts", max_prompts), ("generation_prompts", generation_prompts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be an integer >= 0, got {value!r}")
    positive_int(n, "n", optional=True)
    facts = load_known_facts(known_facts, require=(*KNOWN_FACT_KEYS, "relation_id"))
    by_relation: dict[str, list[dict]] = defaultdict(list)
    for fact in facts:
        by_relation[fact["relation_id"]].append(fact)
    candidates = answered_correctly(model, facts) if only_correct else list(facts)
    log.info("%d of %d known facts usable (only_correct=%s)", len(candidates), len(facts),
             only_correct)
    rng = random.Random(seed)
    candidates = sorted(candidates, key=lambda f: str(f["known_id"]))
    rng.shuffle(candidates)
    cases = []
    for fact in candidates:
        relation = by_relation[fact["relation_id"]]
        subject, old = fact["subject"], fact["attribute"]
        prompt = fact["prompt"].replace(subject, "{}", 1)
        templates = sorted({f["prompt"].replace(f["subject"], "{}", 1) for f in relation})
        paraphrases = [fill(t, subject) for t in templates if t != prompt]
        neighbours = sorted({f["prompt"] for f in relation
                             if f["attribute"] == old and f["subject"] != subject})
        others = sorted({f["attribute"] for f in relation} - {old})
        if not paraphrases or not neighbours or not others:
            continue
        new = rng.choice(others)
        attributes = sorted({f["prompt"] for f in relation
                             if f["attribute"] == new and f["subject"] != subject})
        paraphrases = rng.sample(paraphrases, min(max_prompts, len(paraphrases)))
        neighbours = rng.sample(neighbours, min(max_prompts, len(neighbours)))
        attributes = rng.sample(attributes, min(max_prompts, len(attributes)))
        generation = rng.sample([fill(prompt, subject), *paraphrases],
                                min(generation_prompts, len(paraphrases) + 1))
        cases.append(CounterFactCase(
            fact["known_id"], prompt, subject, new, old, fact["relation_id"],
            tuple(paraphrases), tuple(neighbours), tuple(attributes), tuple(generation)))
        if n is not None and len(cases) == n:
            break
    if not cases:
        raise InputError("no known fact has both paraphrases (another template of its relation) "
                         "and neighbours (another subject with its relation and object)")
    if n is not None and len(cases) < n:
        log.warning("only %d cases could be built (asked for %d)", len(cases), n)
    return cases
