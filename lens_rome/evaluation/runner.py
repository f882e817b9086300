"""Judging an editor as the paper does: CounterFact and zsRE metrics, and a resumable runner.

CounterFact (Meng et al. 2022, section 4.2).  ``P(o)`` of a multi-token
object is ``exp`` of its mean token log-probability after the prompt
(teacher-forced), so objects of different lengths compare fairly:

- efficacy score ES: fraction of cases with ``P(o*) > P(o)`` on the rewrite
  prompt; magnitude EM: mean ``P(o*) - P(o)``;
- paraphrase score PS / magnitude PM: the same on the paraphrase prompts,
  averaged per case, then over cases;
- neighbourhood score NS: fraction of neighbourhood prompts (other subjects,
  same relation and true object) where ``P(o) > P(o*)``, per case then over
  cases; NM: mean ``P(o) - P(o*)``;
- score S: the harmonic mean of ES, PS and NS;
- fluency (generation entropy): per generated text, the entropy in bits of
  its bi-gram and tri-gram frequency distributions, weighted 2/3 and 4/3 and
  averaged (:func:`ngram_entropy`); averaged over a case's texts, then over cases;
- consistency (reference score): tf-idf cosine between a case's generated
  texts (joined) and a reference text about ``o*`` (:class:`Consistency`).

All scores are in percent; fluency and consistency are multiplied by 100 too,
which is how the paper's tables print them.

zsRE (section 4.1 and the paper's code): token accuracy, teacher-forced: the
fraction of the answer's tokens that are the model's top prediction given the
question and the answer's previous tokens, for the edited question
(efficacy), its paraphrase (paraphrase) and an unrelated question with its
own answer (specificity).

:func:`evaluate` applies a method (:mod:`lens_rome.editing.registry`) to each case,
measures it, reverts it, and writes one JSON file per case (atomically) under
``out_dir/cases``; a rerun skips finished cases, so an interrupted run
resumes without redoing or losing any.  ``summary.json`` is recomputed from
the case files by :func:`summarize`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lens_rome.checks import positive_int
from lens_rome.data.cases import CounterFactCase, ZsreCase
from lens_rome.editing.memit import load_edit
from lens_rome.editing.registry import apply_batch, describe, make_method, method_name
from lens_rome.errors import InputError, SavedFileError, WrongTypeError
from lens_rome.evaluation.collapse import DEFAULT_CHUNKS, collapse_warning, perplexity
from lens_rome.evaluation.counterfact import (
    DEFAULT_ANSWER_TOKENS,
    GENERATED_KEYS,
    PLUS_KEYS,
    generated_answers,
    kl_divergences,
    plus_prompts,
    summarize_generated,
)
from lens_rome.evaluation.measures import (
    DEFAULT_NEW_TOKENS,
    DEFAULT_TOP_K,
    generate,
    next_token_log_probs,
    probabilities,
    target_log_probs,
    token_accuracy,
)
from lens_rome.evaluation.text import Consistency, fluency, harmonic_mean
from lens_rome.model.adapter import ModelAdapter, adapter_for, model_fingerprint
from lens_rome.model.backend import Model
from lens_rome.storage import (
    RUN_FILE,
    check_resumable,
    check_same_items,
    content_hash,
    replacing,
    write_json,
)

log = logging.getLogger(__name__)

PAPER_KEYS = ("n", "efficacy_score", "efficacy_magnitude", "paraphrase_score",
              "paraphrase_magnitude", "neighborhood_score", "neighborhood_magnitude",
              "score", "fluency", "consistency")
PERPLEXITY_KEYS = ("perplexity", "perplexity_max")  # of the edited model(s), per case or batch
COUNTERFACT_KEYS = PAPER_KEYS + GENERATED_KEYS + PLUS_KEYS + PERPLEXITY_KEYS + ("protocol",)
ZSRE_KEYS = ("n", "efficacy", "paraphrase", "specificity")
# How each figure of a summary is measured (summary["protocol"] says it per key).
TEACHER_FORCED, GENERATED, SAMPLED = "teacher-forced", "generated (greedy)", "sampled (top-k)"
PROTOCOLS = {
    **{key: TEACHER_FORCED for key in PAPER_KEYS[1:8] + PLUS_KEYS[:2]},
    "fluency": SAMPLED, "consistency": SAMPLED,
    **{key: GENERATED for key in GENERATED_KEYS},
    "neighborhood_plus_kl": "next-token distribution",
    **{key: "held-out text" for key in PERPLEXITY_KEYS + ("perplexity_unedited",)},
}
RUN_KEYS = ("n_edits", "batch_size", "sequential", "update_norms",  # added by evaluate
            "perplexity_unedited")
SEQUENTIAL_KEYS = ("checkpoints", "original", "reported", "right_after")  # a sequential run's
SUMMARY = "summary.json"
PERPLEXITY = "perplexity.json"  # the unedited model's perplexity, measured once per run
RIGHT_AFTER = "right_after"  # a sequential run's records of each case right after its edit
# What run.json records that runs of older versions did not: such a run resumes, with a
# warning that these cannot be checked.
UNRECORDED = ("fingerprint", "answer_tokens", "perplexity_chunks")
RUN_CASES = "case_hashes"  # run.json's record of each case's content hash
RUN = RUN_FILE
CASES = "cases"
GENERATION_BATCH = 32  # generation prompts per batched pass in measure_cases
ORIGINAL = "original"
EDITS = "edits"
CHECKPOINTS = "checkpoints"


def case_seed(seed: int, case_id: int | str) -> int:
    """The generation seed of a case: the same on a resumed run."""
    return zlib.crc32(f"{seed}:{case_id}".encode())


def evaluate_case(model: Model, case: CounterFactCase | ZsreCase, method, *,
                  max_new_tokens: int = DEFAULT_NEW_TOKENS, top_k: int = DEFAULT_TOP_K,
                  seed: int = 0, consistency: Consistency | None = None,
                  answer_tokens: int = DEFAULT_ANSWER_TOKENS,
                  perplexity_chunks: int = DEFAULT_CHUNKS) -> dict:
    """Apply ``method`` for ``case``, measure, revert; returns the case's record (JSON-ready).

    CounterFact records hold ``[log P(o*), log P(o)]`` (mean token log-probs) per
    rewrite, paraphrase, neighbourhood and CounterFact+ prompt, the greedy
    continuations (``generated``, with the unedited model's of the neighbourhood
    prompts), the CounterFact+ KL per prompt, the sampled texts with their fluency
    and consistency, and the edited model's ``perplexity`` (held-out text,
    ``perplexity_chunks`` chunks; 0: not measured); zsRE records the per-token
    correctness of each answer.
    """
    adapter = adapter_for(model)
    reference = _unedited_reference(model, [case], answer_tokens)
    start = time.perf_counter()
    before = _w_out_snapshot(adapter)
    change = method.apply(model, case.request)
    edit_seconds = time.perf_counter() - start
    try:
        norm = _change_norm(adapter, before)
        del before
        if isinstance(case, CounterFactCase):
            record = _measure_counterfact(model, case, max_new_tokens, top_k, seed, consistency,
                                          answer_tokens)
        else:
            record = _measure_zsre(model, case)
        _compare_with_unedited(model, [case], [record], reference)
        if perplexity_chunks:
            record["perplexity"] = perplexity(model, chunks=perplexity_chunks)
    finally:
        change.revert()
    return {"case_id": case.case_id, "method": method.name, **record, "update_norm": norm,
            "edit_seconds": edit_seconds, "seconds": time.perf_counter() - start}


def _unedited_reference(model: Model, cases: Sequence, answer_tokens: int) -> list[dict | None]:
    """Per CounterFact case, what the unedited model does on its neighbourhood: the next-token
    log-probabilities ``[n_prompts, d_vocab]`` after the CounterFact+ prompts, and the greedy
    continuations of the neighbourhood prompts (None for other cases)."""
    counterfact = [c for c in cases if isinstance(c, CounterFactCase)]
    if not counterfact:
        return [None] * len(cases)
    answers = iter(generated_answers(model, counterfact, answer_tokens))
    return [{"plus": next_token_log_probs(model, plus_prompts(c)),
             "neighborhood": next(answers)["neighborhood"]}
            if isinstance(c, CounterFactCase) else None for c in cases]


def _compare_with_unedited(model: Model, cases: Sequence, records: Sequence[dict],
                           reference: Sequence[dict | None]) -> None:
    """Add the CounterFact+ KL and the unedited continuations to each CounterFact record."""
    for case, record, unedited in zip(cases, records, reference):
        if unedited is not None:
            edited = next_token_log_probs(model, plus_prompts(case))
            record["neighborhood_plus_kl"] = kl_divergences(unedited["plus"], edited)
            record["neighborhood_unedited"] = unedited["neighborhood"]


def w_out_snapshot(model: Model) -> list[torch.Tensor]:
    """A copy of every layer's ``W_out`` (what editing methods change)."""
    return _w_out_snapshot(adapter_for(model))


def _w_out_snapshot(adapter: ModelAdapter) -> list[torch.Tensor]:
    return [adapter.w_out(layer).detach().clone() for layer in range(adapter.n_layers)]


def change_norm(model: Model, snapshot: Sequence[torch.Tensor]) -> float:
    """Frobenius norm of the change of all ``W_out`` since ``snapshot`` (all layers together)."""
    return _change_norm(adapter_for(model), snapshot)


def _change_norm(adapter: ModelAdapter, snapshot: Sequence[torch.Tensor]) -> float:
    total = 0.0
    for layer, before in enumerate(snapshot):
        total += float((adapter.w_out(layer).detach().double() - before.double()).norm()) ** 2
    return math.sqrt(total)


def measure_cases(model: Model, cases: Sequence[CounterFactCase | ZsreCase], *,
                  max_new_tokens: int = DEFAULT_NEW_TOKENS, top_k: int = DEFAULT_TOP_K,
                  seed: int = 0, consistency: Consistency | None = None,
                  answer_tokens: int = DEFAULT_ANSWER_TOKENS,
                  generation_batch: int = GENERATION_BATCH, progress: bool = False
                  ) -> list[dict]:
    """The measures of :func:`evaluate_case` for many cases on the model as it is (no edit;
    no KL, perplexity or unedited continuations: they compare two models).

    Generation runs for the prompts of many cases at once (``generation_batch``
    per pass), each prompt with the seed it has in :func:`evaluate_case`.
    """
    records = []
    for case in tqdm(cases, desc="measure", unit="case", disable=not progress):
        if isinstance(case, CounterFactCase):
            record = _measure_counterfact(model, case, 0, top_k, seed, None, None)
        else:
            record = _measure_zsre(model, case)
        records.append({"case_id": case.case_id, **record})
    counterfact = [(i, c) for i, c in enumerate(cases) if isinstance(c, CounterFactCase)]
    for start in range(0, len(counterfact), generation_batch):
        chunk = counterfact[start:start + generation_batch]
        for (i, _), made in zip(chunk, generated_answers(model, [c for _, c in chunk],
                                                         answer_tokens)):
            records[i]["generated"] = made
    if max_new_tokens > 0 and counterfact:
        jobs = [(i, p, case_seed(seed, c.case_id) + j) for i, c in counterfact
                for j, p in enumerate(c.generation_prompts)]
        texts: dict[int, list[str]] = {i: [] for i, _ in counterfact}
        for start in range(0, len(jobs), generation_batch):
            chunk = jobs[start:start + generation_batch]
            out = generate(model, [p for _, p, _ in chunk], max_new_tokens, top_k=top_k,
                           seed=[s for _, _, s in chunk])
            for (i, _, _), text in zip(chunk, out):
                texts[i].append(text)
        for i, case in counterfact:
            generated = texts[i]
            consistent = consistency.score(generated, case.target_new) \
                if consistency and generated else math.nan
            records[i].update(generations=generated, fluency=_json_float(fluency(generated)),
                              consistency=_json_float(consistent))
    return records


def _measure_counterfact(model, case: CounterFactCase, max_new_tokens, top_k, seed,
                         consistency, answer_tokens: int | None) -> dict:
    """One case's record (teacher-forced, sampled, and greedy unless ``answer_tokens`` is None)."""
    request = case.request
    prompts = [case.rewrite_prompt, *case.paraphrase_prompts, *case.neighborhood_prompts,
               *plus_prompts(case)]
    lp = target_log_probs(model, prompts, [request.target_new, request.target_true]).tolist()
    n_para, n_neighbours = len(case.paraphrase_prompts), len(case.neighborhood_prompts)
    texts = generate(model, list(case.generation_prompts), max_new_tokens, top_k=top_k,
                     seed=case_seed(seed, case.case_id)) \
        if max_new_tokens > 0 and case.generation_prompts else []
    consistent = consistency.score(texts, case.target_new) if consistency and texts else math.nan
    neighbours_end = 1 + n_para + n_neighbours
    record = {
        "format": "counterfact",
        "rewrite": lp[:1], "paraphrase": lp[1:1 + n_para],
        "neighborhood": lp[1 + n_para:neighbours_end], "neighborhood_plus": lp[neighbours_end:],
        "generations": texts,
        "fluency": _json_float(fluency(texts)), "consistency": _json_float(consistent),
    }
    if answer_tokens is not None:
        record["generated"] = generated_answers(model, [case], answer_tokens)[0]
    return record


def _measure_zsre(model, case: ZsreCase) -> dict:
    answer = " " + case.target_new
    return {
        "format": "zsre",
        "efficacy": token_accuracy(model, case.src, answer),
        "paraphrase": token_accuracy(model, case.rephrase, answer),
        "specificity": token_accuracy(model, case.loc + "?", " " + case.loc_ans.strip()),
    }


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def summarize(records: Sequence[Mapping]) -> dict:
    """The summary of per-case records (all CounterFact or all zsRE), scores in percent.

    CounterFact: ``n``, efficacy/paraphrase/neighborhood score and magnitude,
    ``score`` (harmonic mean of the three scores), ``fluency`` and
    ``consistency`` (means over the cases that have them; None if none has);
    the generated protocol's and CounterFact+'s figures
    (:func:`~lens_rome.evaluation.counterfact.summarize_generated`); the edited
    models' mean and largest ``perplexity``; and ``protocol``, how each figure
    is measured (teacher-forced, generated, ...).
    zsRE: ``n``, ``efficacy``, ``paraphrase``, ``specificity``.
    """
    if not records:
        raise InputError("no case records to summarise")
    formats = {r.get("format") for r in records}
    if len(formats) != 1 or not formats <= {"counterfact", "zsre"}:
        raise InputError(f"records must all be 'counterfact' or all 'zsre', "
                         f"got {sorted(map(str, formats))}")
    if formats == {"zsre"}:
        return {"n": len(records), **{
            key: _percent(np.mean(r[key]) if r[key] else math.nan for r in records)
            for key in ZSRE_KEYS[1:]}}

    def per_case(key: str, better_new: bool) -> tuple[list[float], list[float]]:
        scores, margins = [], []
        for record in records:
            pairs = np.asarray(record[key], dtype=float).reshape(-1, 2)
            if not len(pairs):
                scores.append(math.nan), margins.append(math.nan)
                continue
            sign = 1 if better_new else -1
            scores.append(float(np.mean(sign * (pairs[:, 0] - pairs[:, 1]) > 0)))
            probs = probabilities(pairs)
            margins.append(float(np.mean(sign * (probs[:, 0] - probs[:, 1]))))
        return scores, margins

    summary: dict[str, Any] = {"n": len(records)}
    for key, prefix, better_new in (("rewrite", "efficacy", True),
                                    ("paraphrase", "paraphrase", True),
                                    ("neighborhood", "neighborhood", False)):
        scores, margins = per_case(key, better_new)
        summary[f"{prefix}_score"] = _percent(scores)
        summary[f"{prefix}_magnitude"] = _percent(margins)
    parts = [summary[f"{p}_score"] for p in ("efficacy", "paraphrase", "neighborhood")]
    summary["score"] = _json_float(harmonic_mean(math.nan if p is None else p for p in parts))
    summary["fluency"] = _percent(r.get("fluency") for r in records)
    summary["consistency"] = _percent(r.get("consistency") for r in records)
    summary.update(summarize_generated(records))
    perplexities = [r["perplexity"] for r in records if r.get("perplexity") is not None]
    summary["perplexity"] = float(np.mean(perplexities)) if perplexities else None
    summary["perplexity_max"] = max(perplexities) if perplexities else None
    summary["protocol"] = dict(PROTOCOLS)
    return {key: summary[key] for key in COUNTERFACT_KEYS}


def _percent(values: Iterable[float | None]) -> float | None:
    """100 x the mean of the values that exist (None when none does)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return 100 * float(np.mean(kept)) if kept else None


def case_path(out_dir: str | Path, case_id: int | str) -> Path:
    """Where the record of case ``case_id`` lives under ``out_dir``."""
    return Path(out_dir) / CASES / f"{case_id}.json"


def load_records(out_dir: str | Path, cases: Sequence[CounterFactCase | ZsreCase] | None = None
                 ) -> list[dict]:
    """The finished case records under ``out_dir`` (only those of ``cases``, in order, if given)."""
    if cases is None:
        paths = sorted((Path(out_dir) / CASES).glob("*.json"))
    else:
        paths = [case_path(out_dir, c.case_id) for c in cases]
    records = []
    for path in paths:
        record = _read_record(path)
        if record is not None:
            records.append(record)
    return records


def _read_record(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:  # written atomically, so only by hand
        log.warning("case file %s is unreadable (%s); the case is run again", path, error)
        return None


def evaluate(
    model: Model,
    cases: Sequence[CounterFactCase | ZsreCase],
    method: str | Any = "rome",
    out_dir: str | Path = "evaluation",
    *,
    limit: int | None = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    top_k: int = DEFAULT_TOP_K,
    seed: int = 0,
    consistency: Consistency | bool | None = None,
    method_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    batch_size: int = 1,
    sequential: bool = False,
    checkpoints: Sequence[int] | None = None,
    original_dir: str | Path | None = None,
    checkpoint_sample: int | None = None,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    perplexity_chunks: int = DEFAULT_CHUNKS,
) -> dict:
    """Evaluate ``method`` on ``cases``.

    By default each case starts from the unedited model: edit, measure, revert.
    With ``batch_size=N`` the cases are edited ``N`` at a time (one edit for
    MEMIT and AlphaEdit, ``N`` edits in turn for the others), measured, and
    reverted.  With ``sequential=True`` the batches are applied in order and
    never reverted until the end: after the last batch (and after each of
    ``checkpoints``, counted in edits) every case edited so far is measured,
    next to the unedited model's measures of the same cases, which are taken
    before the first edit and kept in ``original_dir``.

    Args:
        method: ``"rome"``, ``"r-rome"``, ``"memit"``, ``"alphaedit"``, ``"ft"``,
            ``"ft-l"``, ``"none"`` (built with ``method_options`` by
            :func:`lens_rome.editing.registry.make_method`) or a method object with
            ``.name`` and ``.apply(model, request)``.
        out_dir: gets ``cases/<case_id>.json`` per case, ``run.json`` (method,
            model and settings; a rerun must match them) and ``summary.json``;
            a sequential run also ``edits/`` (each batch's saved edit, re-applied
            on resume), ``checkpoints/<n_edits>.json`` and, unless
            ``original_dir`` is given, ``original/``.  A rerun resumes.
        limit: evaluate only the first ``limit`` cases.
        max_new_tokens, top_k: generation for fluency and consistency
            (CounterFact); 0 tokens skips generation.
        answer_tokens: greedy tokens per prompt for the generated protocol
            (:mod:`lens_rome.evaluation.counterfact`).
        perplexity_chunks: the collapse monitor's held-out text, in chunks of 128
            tokens (:mod:`lens_rome.evaluation.collapse`): measured on the
            unedited model, after each edit (each batch; at each checkpoint of a
            sequential run); 0 measures none.  A rise past
            :data:`~lens_rome.evaluation.collapse.COLLAPSE_RATIO` is warned about.
        consistency: a :class:`Consistency`; None: the offline Wikipedia
            summaries if installed; False: none (consistency is None).
        batch_size: edits per batch.
        sequential: apply the batches one after another without reverting.
        checkpoints: numbers of edits after which a sequential run measures
            (multiples of ``batch_size``); the end is always measured.
        original_dir: where the unedited model's measures are cached (several
            sequential runs over the same cases can share it).
        checkpoint_sample: with ``sequential``, measure at most this many of the
            cases edited so far at each checkpoint (None: all of them), so that
            a checkpoint's cost stays bounded.  The sample is the first cases of
            one seeded permutation of ``cases`` that are already edited: the same
            on a resumed run, and a case once in it stays in it at the later
            checkpoints of the same size.

    Returns the summary (see :func:`summarize`) with ``n_edits``,
    ``batch_size``, ``sequential``, ``update_norms`` (Frobenius norm of each
    batch's change to the weights) and ``perplexity_unedited``; a sequential run
    reports each case measured on the final model (``reported`` says so) and
    adds ``right_after`` (the summary of each case measured right after its own
    edit, before the next), ``checkpoints`` (the summary after each, next to the
    unedited model's over the same cases, with the perplexity and the norm of the
    whole change so far) and ``original``.  Also written to ``summary.json``.
    """
    name = method_name(method)
    cases = list(cases)
    if not cases:
        raise InputError("the dataset is empty: there are no cases to evaluate")
    kinds = {type(c) for c in cases}
    if len(kinds) != 1 or not kinds <= {CounterFactCase, ZsreCase}:
        raise WrongTypeError(f"cases must all be CounterFactCase or all ZsreCase (see "
                        f"lens_rome.data), got {sorted(k.__name__ for k in kinds)}")
    fmt = "counterfact" if kinds == {CounterFactCase} else "zsre"
    if positive_int(limit, "limit", optional=True) is not None:
        cases = cases[:limit]
    ids = [str(c.case_id) for c in cases]
    if len(set(ids)) != len(ids):
        raise InputError("case ids must be unique: results are stored per case id")
    for option, value in (("max_new_tokens", max_new_tokens),
                          ("perplexity_chunks", perplexity_chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{option} must be an integer >= 0, got {value!r}")
    positive_int(answer_tokens, "answer_tokens")
    positive_int(batch_size, "batch_size")
    if not isinstance(sequential, bool):
        raise WrongTypeError(f"sequential must be True or False, got {sequential!r}")
    marks = _checkpoints(checkpoints, batch_size, len(cases), sequential)
    if checkpoint_sample is not None:
        if not sequential:
            raise InputError("checkpoint_sample is for sequential runs; pass sequential=True")
        positive_int(checkpoint_sample, "checkpoint_sample", optional=True)
    editor = make_method(name, model, **(method_options or {})) \
        if isinstance(method, str) else method

    adapter = adapter_for(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"out_dir {out} exists and is not a folder")
    settings = {"format": fmt, "model": adapter.name, "fingerprint": model_fingerprint(model),
                "method": dict(describe(editor)),
                "max_new_tokens": max_new_tokens, "top_k": top_k, "seed": seed,
                "answer_tokens": answer_tokens, "perplexity_chunks": perplexity_chunks}
    if batch_size != 1 or sequential:  # runs of one edit per case keep their old run.json
        settings.update(batch_size=batch_size, sequential=sequential)
    if sequential:
        settings.update(checkpoints=marks)
        if checkpoint_sample is not None:  # runs without a sample keep their old run.json
            settings.update(checkpoint_sample=checkpoint_sample)
    _check_run(out, settings, case_hashes(cases))
    if fmt == "counterfact" and consistency is None and max_new_tokens > 0:
        try:
            consistency = Consistency.wikipedia()
        except (ModuleNotFoundError, FileNotFoundError) as error:
            log.warning("no consistency scores: %s", error)
            consistency = False
    measures = dict(max_new_tokens=max_new_tokens, top_k=top_k, seed=seed,
                    consistency=consistency or None, answer_tokens=answer_tokens)
    unedited_perplexity = _unedited_perplexity(model, out, perplexity_chunks)
    if unedited_perplexity is None:  # not asked for, or no held-out text installed
        perplexity_chunks = 0

    if sequential:
        samples = checkpoint_samples(len(cases), marks, checkpoint_sample, seed)
        return _evaluate_sequential(adapter, cases, editor, out, batch_size, samples, measures,
                                    Path(original_dir) if original_dir else out / ORIGINAL,
                                    fmt, progress, perplexity_chunks, unedited_perplexity)
    done = sum(case_path(out, c.case_id).exists() for c in cases)
    if done:
        log.info("%s: %d of %d cases already done; resuming", out, done, len(cases))
    batches = [cases[i:i + batch_size] for i in range(0, len(cases), batch_size)]
    bar = tqdm(total=len(cases), desc=f"evaluate {name}", unit="case", disable=not progress)
    for index, batch in enumerate(batches):
        todo = [c for c in batch if _read_record(case_path(out, c.case_id)) is None]
        if not todo:
            bar.update(len(batch))
            continue
        if batch_size == 1:
            records = [evaluate_case(model, batch[0], editor, **measures,
                                     perplexity_chunks=perplexity_chunks)]
        else:
            records = _evaluate_batch(adapter, batch, editor, measures, index,
                                      perplexity_chunks)
        for record in records:
            with replacing(case_path(out, record["case_id"]), overwrite=True) as tmp:
                tmp.write_text(json.dumps(record), encoding="utf-8")
            if unedited_perplexity is not None and record.get("perplexity") is not None:
                collapse_warning(unedited_perplexity, record["perplexity"],
                                 f"{name}, case {record['case_id']}")
        bar.update(len(batch))
    bar.close()

    records = load_records(out, cases)
    norms = {}
    for record in records:  # one norm per batch
        norms.setdefault(record.get("batch", record["case_id"]), record.get("update_norm"))
    summary = {**summarize(records), "n_edits": len(records), "batch_size": batch_size,
               "sequential": False, "update_norms": list(norms.values()),
               "perplexity_unedited": unedited_perplexity}
    write_json(out / SUMMARY, summary)
    return summary


def _unedited_perplexity(model: Model, out: Path, chunks: int) -> float | None:
    """The unedited model's perplexity on ``chunks`` held-out chunks: measured once per run
    (before any edit) and kept in ``out/perplexity.json``; None when ``chunks`` is 0."""
    if not chunks:
        return None
    path = out / PERPLEXITY
    stored = _read_record(path)
    if stored is not None and stored.get("chunks") == chunks:
        return stored["unedited"]
    try:
        value = perplexity(model, chunks=chunks)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        log.warning("no perplexity: %s", error)
        return None
    write_json(path, {"chunks": chunks, "unedited": value})
    return value


def _checkpoints(checkpoints, batch_size: int, n_cases: int, sequential: bool) -> list[int]:
    """Sorted checkpoints (in edits) that fit the run, the last edit included."""
    if checkpoints is None:
        return [n_cases] if sequential else []
    if not sequential:
        raise InputError("checkpoints are for sequential runs; pass sequential=True")
    if isinstance(checkpoints, (str, bytes)) or not isinstance(checkpoints, Iterable):
        raise WrongTypeError(f"checkpoints must be a list of edit counts, got {checkpoints!r}")
    marks = sorted(set(checkpoints))
    for mark in marks:
        positive_int(mark, "each checkpoint (a count of edits)")
        if mark % batch_size and mark != n_cases:
            raise InputError(f"checkpoint {mark} is not a whole number of batches of "
                             f"{batch_size}; use multiples of the batch size")
    beyond = [m for m in marks if m > n_cases]
    if beyond:
        log.warning("checkpoints %s lie beyond the %d cases; measuring at %d instead",
                    beyond, n_cases, n_cases)
    return sorted({m for m in marks if m <= n_cases} | {n_cases})


def checkpoint_samples(n_cases: int, marks: Sequence[int], size: int | None, seed: int = 0
                       ) -> dict[int, list[int]]:
    """For each checkpoint, the indices of the cases it measures (increasing).

    All cases edited so far when ``size`` is None; else the first ``size`` of
    them in one order of the cases seeded by ``seed`` (independent of ``n_cases``, so a
    run extended to more cases keeps the samples of its earlier checkpoints).
    """
    if size is None:
        return {n: list(range(n)) for n in marks}
    # one random key per index, whatever n_cases is: a longer run keeps the shorter one's samples
    order = sorted(range(n_cases), key=lambda i: random.Random(f"{seed}/{i}").random())
    return {n: sorted([i for i in order if i < n][:size]) for n in marks}


def _evaluate_batch(adapter: ModelAdapter, batch, editor, measures, index,
                    perplexity_chunks: int) -> list[dict]:
    """Edit a batch on the unedited model, measure its cases, revert."""
    model = adapter.model
    reference = _unedited_reference(model, batch, measures["answer_tokens"])
    start = time.perf_counter()
    before = _w_out_snapshot(adapter)
    changes = apply_batch(editor, model, [c.request for c in batch])
    edit_seconds = time.perf_counter() - start
    try:
        norm = _change_norm(adapter, before)
        del before
        records = measure_cases(model, batch, **measures)
        _compare_with_unedited(model, batch, records, reference)
        edited = perplexity(model, chunks=perplexity_chunks) if perplexity_chunks else None
    finally:
        for change in reversed(changes):
            change.revert()
    seconds = time.perf_counter() - start
    return [{**r, "method": editor.name, "batch": index, "update_norm": norm,
             "perplexity": edited, "edit_seconds": edit_seconds, "seconds": seconds}
            for r in records]


def _evaluate_sequential(adapter: ModelAdapter, cases, editor, out: Path, batch_size: int,
                         samples: dict[int, list[int]], measures: dict, original_dir: Path,
                         fmt: str, progress: bool, perplexity_chunks: int,
                         unedited_perplexity: float | None) -> dict:
    """Batches in order without reverting; measures each batch's cases right after it, and at
    the checkpoints (``samples``: the case indices each measures) the cases edited so far;
    reverts at the end."""
    model = adapter.model
    marks = sorted(samples)
    measured = sorted({i for indices in samples.values() for i in indices})
    _check_run(original_dir, {
        "format": fmt, "model": adapter.name, "fingerprint": model_fingerprint(model),
        **{k: v for k, v in measures.items() if k != "consistency"},
        "consistency": measures["consistency"] is not None}, case_hashes(cases))
    missing = [cases[i] for i in measured
               if _read_record(case_path(original_dir, cases[i].case_id)) is None]
    if missing:
        log.info("measuring the unedited model on %d cases", len(missing))
        for record in measure_cases(model, missing, progress=progress, **measures):
            write_json(case_path(original_dir, record["case_id"]), record)
    original = {i: _read_record(case_path(original_dir, cases[i].case_id)) for i in measured}

    paths = {n: out / CHECKPOINTS / f"{n:06d}.json" for n in marks}
    n_batches = -(-len(cases) // batch_size)
    metas = [_read_record(out / EDITS / f"{i:06d}.json") for i in range(n_batches)]
    if (all(_read_record(path) is not None for path in paths.values()) and all(metas)
            and all(_read_record(_right_after_path(out, c.case_id)) for c in cases)):
        return _sequential_summary(out, cases, batch_size, marks, paths, metas, original,
                                   unedited_perplexity)

    unedited = _w_out_snapshot(adapter)  # for the norm of the whole change at each checkpoint
    right_after = {**measures, "max_new_tokens": 0}  # no sampled texts between edits
    batches = [cases[i:i + batch_size] for i in range(0, len(cases), batch_size)]
    applied: list = []
    bar = tqdm(total=len(cases), desc=f"sequential {editor.name}", unit="edit",
               disable=not progress)
    try:
        for index, batch in enumerate(batches):
            changes, _ = _batch_changes(adapter, editor, out, index, batch)
            applied += changes
            bar.update(len(batch))
            n_edits = index * batch_size + len(batch)
            todo = [c for c in batch if _read_record(_right_after_path(out, c.case_id)) is None]
            for record in measure_cases(model, todo, **right_after) if todo else ():
                record.update(method=editor.name, batch=index, n_edits=n_edits)
                write_json(_right_after_path(out, record["case_id"]), record)
            if n_edits not in marks or _read_record(paths[n_edits]) is not None:
                continue
            indices = samples[n_edits]
            records = measure_cases(model, [cases[i] for i in indices], **measures)
            for i, record in zip(indices, records):
                record.update(method=editor.name, batch=i // batch_size, n_edits=n_edits)
                before = (original[i].get("generated") or {}).get("neighborhood")
                if before is not None:
                    record["neighborhood_unedited"] = before
            edited = perplexity(model, chunks=perplexity_chunks) if perplexity_chunks else None
            if edited is not None:
                collapse_warning(unedited_perplexity, edited,
                                 f"{editor.name} after {n_edits} edits")
            stored = {"n_edits": n_edits, "measured": len(records),
                      "summary": summarize(records),
                      "original": summarize([original[i] for i in indices]),
                      "perplexity": edited, "update_norm": _change_norm(adapter, unedited),
                      "records": records}
            write_json(paths[n_edits], stored)
            log.info("%s after %d edits: %s", editor.name, n_edits, stored["summary"])
    finally:
        bar.close()
        for change in reversed(applied):
            change.revert()
    metas = [_read_record(out / EDITS / f"{i:06d}.json") for i in range(len(batches))]
    return _sequential_summary(out, cases, batch_size, marks, paths, metas, original,
                               unedited_perplexity)


def _right_after_path(out: Path, case_id: int | str) -> Path:
    return out / RIGHT_AFTER / f"{case_id}.json"


def _sequential_summary(out: Path, cases, batch_size: int, marks: list[int],
                        paths: dict[int, Path], metas: list[dict], original: dict[int, dict],
                        unedited_perplexity: float | None) -> dict:
    """``summary.json`` (and the final case files) of a finished sequential run."""
    checkpoints = []
    for n_edits in marks:
        stored = _read_record(paths[n_edits])
        checkpoints.append({"n_edits": n_edits,
                            "measured": stored.get("measured", len(stored["records"])),
                            "edited": stored["summary"], "original": stored["original"],
                            "perplexity": stored.get("perplexity"),
                            "update_norm": stored.get("update_norm")})
    records = stored["records"]  # the last checkpoint: after every edit
    for record in records:
        write_json(case_path(out, record["case_id"]), record)
    right_after = [_read_record(_right_after_path(out, c.case_id)) for c in cases]
    summary = {**summarize(records), "n_edits": len(cases), "batch_size": batch_size,
               "sequential": True, "update_norms": [m["update_norm"] for m in metas],
               "perplexity_unedited": unedited_perplexity,
               "checkpoints": checkpoints, "original": summarize(list(original.values())),
               "reported": "each measured case on the final model, after all edits; "
                           "right_after: each case right after its own edit",
               "right_after": summarize(right_after) if all(right_after) else None}
    write_json(out / SUMMARY, summary)
    return summary


def _batch_changes(adapter: ModelAdapter, editor, out: Path, index: int, batch
                   ) -> tuple[list, dict]:
    """Apply batch ``index``: from the files a previous run saved, or computed and saved."""
    model = adapter.model
    meta_path = out / EDITS / f"{index:06d}.json"
    meta = _read_record(meta_path)
    ids = [c.case_id for c in batch]
    if meta is not None:
        if meta.get("case_ids") != ids:
            raise SavedFileError(f"{meta_path} is for cases {meta.get('case_ids')}, not {ids}; "
                             f"choose another out_dir")
        if not meta.get("saved"):
            raise SavedFileError(f"{out} holds an interrupted sequential run of {editor.name!r}, "
                             f"whose edits cannot be saved, so it cannot resume; delete {out} "
                             f"or choose another out_dir")
        changes = []
        try:
            for j in range(meta["changes"]):
                changes.append(load_edit(out / EDITS / f"{index:06d}-{j:03d}.safetensors")
                               .apply(model))
        except BaseException:
            for change in reversed(changes):
                change.revert()
            raise
        return changes, meta
    start = time.perf_counter()
    before = _w_out_snapshot(adapter)
    changes = apply_batch(editor, model, [c.request for c in batch])
    seconds = time.perf_counter() - start
    norm = _change_norm(adapter, before)
    del before
    saved = all(hasattr(c, "save") for c in changes)
    if saved:
        for j, change in enumerate(changes):
            change.save(out / EDITS / f"{index:06d}-{j:03d}.safetensors", overwrite=True)
    meta = {"case_ids": ids, "changes": len(changes), "saved": saved, "update_norm": norm,
            "edit_seconds": seconds}
    write_json(meta_path, meta)
    return changes, meta


def _check_run(out: Path, settings: dict, cases: dict[str, str] | None = None) -> None:
    """Write ``run.json``, or check that an earlier run in ``out`` used the same settings and,
    for the case ids it shares with ``cases`` (id -> :func:`case_hashes`), the same cases.

    A sequential run may be extended: the same settings with more checkpoints (all the
    earlier ones among them) continue where the earlier run stopped; more cases may
    be added to any run.
    """
    path = out / RUN
    stored = _read_record(path)
    now = json.loads(json.dumps(settings))
    entry = {} if cases is None else {RUN_CASES: cases}
    if stored is None:
        write_json(path, {**now, **entry})
        return
    stored_cases = stored.pop(RUN_CASES, None)
    extending = _extends(stored, {k: v for k, v in now.items()
                                  if k in stored or k not in UNRECORDED})
    if extending:
        log.info("%s: extending the run to the checkpoints %s", out, settings["checkpoints"])
    else:
        check_resumable(out, settings, stored, unrecorded=UNRECORDED)
    if cases is not None:
        entry = {RUN_CASES: check_same_items(out, stored_cases, cases, what="case",
                                             fix="choose another out_dir")}
    if extending or entry.get(RUN_CASES) != stored_cases:
        write_json(path, {**(now if extending else stored), **entry})


def case_hashes(cases: Sequence[CounterFactCase | ZsreCase]) -> dict[str, str]:
    """``case id -> content hash`` of each case's record: what ties a run to its dataset."""
    return {str(c.case_id): content_hash(c.to_dict()) for c in cases}


def _extends(stored: dict, now: dict) -> bool:
    """Whether the settings ``now`` are the sequential run ``stored`` with more checkpoints."""
    return (stored != now and bool(stored.get("sequential"))
            and {**stored, "checkpoints": None} == {**now, "checkpoints": None}
            and set(stored.get("checkpoints") or ()) <= set(now.get("checkpoints") or ()))
