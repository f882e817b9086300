"""Causal tracing over a dataset of facts: the paper's averages (its Figures 2 and 3).

One trace is an anecdote; the paper's claims are averages over many facts.
:func:`trace_dataset` keeps the facts the model answers correctly (the
paper's filter), traces each one for every kind of state with the same noise,
and adds the *severed* experiment: the hidden-state trace at the last subject
token with the MLP (or attention) outputs frozen at their corrupted values.

Every traced fact is written at once to its own parquet file under
``out/facts/``, so a stopped run resumes where it stopped and never traces a
fact twice.  The aggregate (:class:`DatasetTrace`) groups tokens by the
paper's categories (first / middle / last subject token, first subsequent
token, further tokens, last token) and reports, per kind and layer, the
average indirect effect with a 95% bootstrap interval over facts, and the
average total effect.

Noise follows the paper: a Gaussian whose std is 3x the std of the embeddings
of all the dataset's subject tokens (its ``collect_embedding_std`` rule),
drawn afresh for each fact from ``seed + known_id`` and shared by the kinds of
that fact.  Scale-out over several processes or machines is in
:mod:`lens_rome.tracing.distributed`.

``method="attribution"`` replaces each fact's exact traces by attribution-
patching estimates of the same probabilities (:mod:`lens_rome.tracing.attribution`:
one forward and one backward pass per fact, no severed experiment).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lens_rome.checks import positive_int
from lens_rome.data.known_facts import answered_correctly, load_known_facts
from lens_rome.errors import InputError, SavedFileError
from lens_rome.model.adapter import adapter_for, model_fingerprint
from lens_rome.model.backend import Model
from lens_rome.model.loading import load_model
from lens_rome.model.precision import resolve_bf16
from lens_rome.storage import content_hash
from lens_rome.tracing.distributed import trace_on_ray
from lens_rome.tracing.fact import TraceSettings, trace_fact
from lens_rome.tracing.kinds import CATEGORIES, KINDS, METHODS, token_categories
from lens_rome.tracing.noise_rules import _embedding_std
from lens_rome.tracing.store import RUN_FACTS, RUN_FILE, FactStore

log = logging.getLogger(__name__)

SEVERED = ("none", "mlp", "attn")
def trace_dataset(
    model: Model | str,
    facts: str | Path | Sequence[Mapping[str, Any]],
    out: str | Path,
    kinds: Sequence[str] = KINDS,
    *,
    limit: int | None = None,
    only_correct: bool = True,
    samples: int = 10,
    window: int = 10,
    noise_scale: float = 3.0,
    severed: bool = True,
    seed: int = 0,
    bf16: bool | str = False,
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    method: str = "exact",
    backend: str | None = None,
) -> "DatasetTrace":
    """Trace every fact ``model`` answers correctly; results go to ``out`` as they finish.

    Args:
        model: a loaded model, or a model name (required for Ray workers, which
            load the model themselves).
        facts: known facts (path or records, see :func:`lens_rome.data.load_known_facts`).
        out: the run's folder; rerunning with the same folder resumes it.
        kinds: states to trace (``"hidden"``, ``"mlp"``, ``"attn"``).
        limit: trace at most this many of the correctly answered facts.
        only_correct: keep only facts the model answers correctly (the paper's
            filter); with False every fact is traced, each scored on the
            model's own most likely answer.
        noise_scale: noise std in units of the subject-token embedding std.
        severed: also run the severed experiment (needs ``"hidden"`` in kinds).
        bf16: restored passes in bfloat16 (``"auto"``: where the hardware makes
            it faster; see :mod:`lens_rome.model.precision`).  Default float32, exact.
            The precision that ran is recorded in ``run.json``.
        workers, address: run on Ray (see :mod:`lens_rome.tracing.distributed`):
            ``workers`` processes on a local runtime, or join the cluster at
            ``address``.
        method: ``"exact"`` (restored runs) or ``"attribution"`` (attribution-
            patching estimates of the same probabilities, in float32; needs
            ``severed=False``).
        backend: with a model name, ``"hooked"`` or ``"bridge"`` (see
            :func:`lens_rome.load_model`); Ray workers load that backend too.

    Returns the aggregate over all facts in ``out`` (:class:`DatasetTrace`).
    """
    kinds = _check_kinds(kinds)
    if method not in METHODS:
        raise InputError(f"method must be 'exact' or 'attribution', got {method!r}")
    if method == "attribution":
        if severed or bf16 is True:
            raise InputError("method='attribution' estimates plain traces in float32: pass "
                             "severed=False and bf16=False (the severed experiment needs "
                             "exact restorations)")
        bf16 = False  # "auto" too: attribution runs in float32
    if severed and "hidden" not in kinds:
        raise InputError("the severed experiment needs 'hidden' in kinds; add it or pass "
                         "severed=False")
    positive_int(samples, "samples")
    positive_int(window, "window")
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not (
            math.isfinite(noise_scale) and noise_scale >= 0):
        raise InputError(f"noise_scale must be a finite number >= 0 (3.0 is the paper's), "
                         f"got {noise_scale!r}")
    positive_int(limit, "limit", optional=True)
    facts = load_known_facts(facts)
    given = model  # Ray workers load a name themselves, or receive this model
    adapter = adapter_for(load_model(model, backend=backend) if isinstance(model, str) else model)
    model = adapter.model
    model_name = given if isinstance(given, str) else adapter.name

    started = time.perf_counter()
    kept = answered_correctly(model, facts) if only_correct else list(facts)
    n_skipped = len(facts) - len(kept)
    log.info("%d of %d facts answered correctly", len(kept), len(facts))
    if limit is not None:
        kept = kept[:limit]
    if not kept:
        raise InputError(f"{model_name} answers none of the {len(facts)} facts correctly; "
                         "nothing to trace (only_correct=False / --all-facts traces them anyway)")
    bf16 = resolve_bf16(bf16, adapter.device, what="trace_dataset")
    level = noise_scale * _embedding_std(adapter, [f["subject"] for f in facts])
    settings = TraceSettings(model=model_name, kinds=kinds, samples=samples, window=window,
                             noise_level=round(level, 8), severed=severed, seed=seed, bf16=bf16,
                             method=method, fingerprint=model_fingerprint(model))
    store = FactStore(out)
    store.check_settings(settings, {str(f["known_id"]): content_hash(f) for f in kept})
    done = store.done()
    todo = [f for f in kept if int(f["known_id"]) not in done]
    log.info("%d facts already traced in %s, %d to go", len(kept) - len(todo), out, len(todo))

    if workers is not None or address is not None:
        trace_on_ray(given, todo, settings, store, workers=workers, address=address,
                     progress=progress, backend=backend)
    else:
        bar = tqdm(todo, desc="facts", unit="fact", disable=not progress)
        last = None
        for fact in bar:
            bar.set_postfix_str(("" if last is None else f"last {last:.1f} s/fact, ")
                                + fact["subject"][:30])
            began = time.perf_counter()
            store.write(fact["known_id"], trace_fact(model, fact, settings))
            last = time.perf_counter() - began

    report = {"facts": len(facts), "answered_correctly": len(facts) - n_skipped,
              "selected": len(kept), "traced_this_run": len(todo),
              "seconds_this_run": round(time.perf_counter() - started, 1)}
    store.write_run(settings, report)
    return DatasetTrace.load(out, known_ids=[int(f["known_id"]) for f in kept])


def _check_kinds(kinds: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise InputError(f"unknown kinds {unknown or kinds!r}; expected some of {list(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)


@dataclass
class DatasetTrace:
    """Per-fact traces of a dataset run and their averages.

    ``frame``: the long-format rows of :func:`trace_fact` for every fact.
    """

    frame: pd.DataFrame
    settings: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @classmethod
    def load(cls, out: str | Path, known_ids: Iterable[int] | None = None) -> "DatasetTrace":
        """The run in ``out`` (only ``known_ids`` when given)."""
        store = FactStore(out)
        if not (store.out / RUN_FILE).exists():
            raise SavedFileError(f"{store.out} holds no dataset trace (no {RUN_FILE})")
        frame = store.read()
        if known_ids is not None:
            frame = frame[frame["known_id"].isin(set(known_ids))].reset_index(drop=True)
        run = store.read_run()
        return cls(frame, run.get("settings", {}),
                   {k: v for k, v in run.items() if k not in ("settings", RUN_FACTS)})

    @property
    def n_facts(self) -> int:
        return int(self.frame["known_id"].nunique())

    @property
    def n_layers(self) -> int:
        return int(self.frame["layer"].max()) + 1

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if k in set(self.frame["kind"])]

    def facts(self) -> pd.DataFrame:
        """One row per fact: known_id, n_tokens, subject range, answer, clean and corrupted scores."""
        columns = ["known_id", "n_tokens", "subject_start", "subject_end", "answer",
                   "high_score", "low_score"]
        first = self.frame[(self.frame["kind"] == self.kinds[0]) & (self.frame["sever"] == "none")]
        facts = first.drop_duplicates("known_id")[columns].reset_index(drop=True)
        facts["total_effect"] = facts["high_score"] - facts["low_score"]
        return facts

    def total_effect(self) -> dict[str, float]:
        """Average clean score, corrupted score and total effect (ATE) over facts."""
        facts = self.facts()
        return {"clean": float(facts["high_score"].mean()),
                "corrupted": float(facts["low_score"].mean()),
                "total_effect": float(facts["total_effect"].mean()),
                "n_facts": len(facts)}

    def effects(self, kind: str, sever: str = "none") -> np.ndarray:
        """Indirect effects ``[n_facts, n_categories, n_layers]`` (NaN where a fact lacks a category).

        A fact's value for a category is the mean over its tokens of that category.
        """
        rows = self.frame[(self.frame["kind"] == kind) & (self.frame["sever"] == sever)]
        if rows.empty:
            raise InputError(f"no traces of kind {kind!r} with sever={sever!r} in this run")
        facts = sorted(rows["known_id"].unique())
        out = np.full((len(facts), len(CATEGORIES), self.n_layers), np.nan)
        for f, (known_id, group) in enumerate(rows.groupby("known_id", sort=True)):
            first = group.iloc[0]
            grid = np.full((int(first["n_tokens"]), self.n_layers), np.nan)
            grid[group["token"].to_numpy(), group["layer"].to_numpy()] = (
                group["score"].to_numpy() - group["low_score"].to_numpy())
            cats = token_categories(int(first["n_tokens"]), int(first["subject_start"]),
                                    int(first["subject_end"]))
            for c, name in enumerate(CATEGORIES):
                if name in cats and not np.isnan(grid[cats[name]]).all():
                    out[f, c] = np.nanmean(grid[cats[name]], axis=0)
        return out

    def average(self, kind: str, sever: str = "none", *, n_boot: int = 1000, seed: int = 0
                ) -> pd.DataFrame:
        """Average indirect effect by category and layer with a 95% bootstrap interval.

        Long format: kind, sever, category, layer, aie, low, high, n_facts
        (facts resampled with replacement ``n_boot`` times).
        """
        effects = self.effects(kind, sever)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(effects), size=(n_boot, len(effects)))
        with warnings.catch_warnings():  # a resample may lack a rare category: NaN, skipped
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(effects, axis=0)
            boot = np.stack([np.nanmean(effects[d], axis=0) for d in draws])
            low, high = np.nanpercentile(boot, [2.5, 97.5], axis=0)
        counts = (~np.isnan(effects[:, :, 0])).sum(0)
        records = []
        for c, name in enumerate(CATEGORIES):
            if counts[c] == 0 or (sever != "none" and name != "last subject token"):
                continue  # severed traces restore the last subject token only
            for layer in range(self.n_layers):
                records.append((kind, sever, name, layer, mean[c, layer], low[c, layer],
                                high[c, layer], int(counts[c])))
        return pd.DataFrame(records, columns=["kind", "sever", "category", "layer", "aie", "low",
                                              "high", "n_facts"])

    def to_frame(self, n_boot: int = 1000) -> pd.DataFrame:
        """:meth:`average` for every kind and severed variant in the run, stacked."""
        parts = [self.average(kind, n_boot=n_boot) for kind in self.kinds]
        for sever in ("mlp", "attn"):
            if ((self.frame["sever"] == sever)).any():
                parts.append(self.average("hidden", sever, n_boot=n_boot))
        return pd.concat(parts, ignore_index=True)

    def plot_effects(self, n_boot: int = 1000):
        """The paper's Figure 2: AIE heatmaps by token category and layer, one per kind,
        and, below, the AIE at the last subject token and the last token across layers
        with 95% intervals.  Returns a matplotlib Figure."""
        from lens_rome.views.dataset import plot_dataset_effects  # noqa: PLC0415 (matplotlib loads on use)

        return plot_dataset_effects(self, n_boot=n_boot)

    def plot_severed(self, n_boot: int = 1000):
        """The paper's Figure 3: the hidden-state AIE at the last subject token across
        layers, plain and with MLP or attention severed.  Returns a matplotlib Figure."""
        from lens_rome.views.dataset import plot_dataset_severed  # noqa: PLC0415 (matplotlib loads on use)

        return plot_dataset_severed(self, n_boot=n_boot)
