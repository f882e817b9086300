"""Loading models, and the one place that knows how a model is laid out.

Tracing and editing never touch hook names, ``W_out`` or BOS handling
directly: they ask the :class:`ModelAdapter` returned by :func:`adapter_for`.
Supporting another kind of model (a ``TransformerBridge``, say) means writing
one more adapter, not changing tracing or editing.

The two embedded models ship as GGUF files inside pip packages, so they load
with no network.  The first load dequantises them to float32 and converts the
weights to TransformerLens' layout; the result is cached on disk
(safetensors plus a manifest with checksums) so later loads take seconds.
Processes that load a model for the first time together (two notebooks, test
workers) build it once: the others wait on the cache folder's ``.lock``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from lens_rome.errors import InputError, ModelUnavailableError
from lens_rome.model.adapter import adapter_for
from lens_rome.model.backend import BACKENDS, DEFAULT_BACKEND, Model, require_hooked
from lens_rome.model.embedded import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModel,
    default_cache_dir,
)
from lens_rome.model.layout import use_linear_layout

log = logging.getLogger(__name__)


CACHE_FORMAT = 1

def load_model(
    name: str = DEFAULT_MODEL,
    *,
    backend: str | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    rebuild: bool = False,
    linear_layout: bool = True,
) -> Model:
    """A float32 model in eval mode, with no weight processing.

    ``name`` is an embedded model (``"smollm2-135m"``, ``"gemma-3-270m"``),
    loaded offline from its pip package and cached under ``cache_dir``; or any
    name TransformerLens knows (needs a network the first time).
    ``backend``: ``"hooked"`` (a ``HookedTransformer``, the default on
    TransformerLens 3.x) or ``"bridge"`` (a ``TransformerBridge`` around the
    Hugging Face model, the default on 4.x, which has no ``HookedTransformer``).
    ``rebuild=True`` ignores the cache.  ``linear_layout`` (hooked only) stores the
    weights in the memory order ``F.linear`` reads (see :func:`use_linear_layout`;
    the same values, faster on small batches).
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"model name must be a non-empty string, got {name!r}")
    backend = DEFAULT_BACKEND if backend is None else backend
    if backend not in ("hooked", "bridge"):
        raise InputError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "hooked":
        require_hooked("backend='hooked'")
    spec = EMBEDDED_MODELS.get(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if backend == "bridge":
        model = _load_bridge(name, spec, root / "models" / name, rebuild=rebuild)
    elif spec is not None:
        model = _load_embedded(spec, root / "models" / name, rebuild=rebuild)
    else:
        model = _load_from_hub(name)
    adapter_for(model).state.name = name
    model.eval()
    if backend == "bridge":
        return model.to(device)
    model = model.to(device, print_details=False)
    return use_linear_layout(model) if linear_layout else model


def load_hf_model(name: str = DEFAULT_MODEL, *, cache_dir: str | Path | None = None):
    """The plain Hugging Face model (float32, eval mode) and tokenizer of an embedded model,
    offline: what a ``TransformerBridge`` of it wraps, for comparing with Hugging Face code."""
    if name not in EMBEDDED_MODELS:
        raise InputError(f"unknown embedded model {name!r}; expected one of {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    _require_package(spec)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _load_embedded_hf(spec, root / "models" / name / "hf", rebuild=False)


def _load_bridge(name: str, spec: EmbeddedModel | None, cache: Path, *, rebuild: bool):
    """A ``TransformerBridge`` around the Hugging Face model: the embedded one from its
    cached float32 weights (built from the GGUF file once), any other from the hub."""
    from transformer_lens.model_bridge import TransformerBridge  # noqa: PLC0415

    if spec is None:
        return TransformerBridge.boot_transformers(name, device="cpu", dtype=torch.float32)
    _require_package(spec)
    hf_model, tokenizer = _load_embedded_hf(spec, cache / "hf", rebuild=rebuild)
    bridge = TransformerBridge.boot_transformers(
        spec.transformer_lens_name or spec.name, hf_model=hf_model, tokenizer=tokenizer,
        device="cpu", dtype=torch.float32)
    bridge.cfg.default_prepend_bos = spec.prepend_bos
    return bridge


def _load_embedded_hf(spec: EmbeddedModel, cache: Path, *, rebuild: bool):
    """The Hugging Face model and tokenizer, from the cache or built once (as the hooked
    cache is: checksummed, written whole or not at all, one builder at a time)."""
    def build():
        tokenizer, hf_model = _hf_from_gguf(spec, cache.parent)
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        if getattr(hf_model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the embedding matrix itself
        _write_files(cache, state, tokenizer, {
            "format": CACHE_FORMAT, "name": spec.name, "hf_config": hf_model.config.to_dict()})
        return hf_model.eval(), tokenizer

    return _read_or_build(cache, lambda: _read_hf_cache(spec, cache), build, rebuild=rebuild)


def _read_hf_cache(spec: EmbeddedModel, cache: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    try:
        manifest, state = _read_files(spec, cache)
        if manifest is None:
            return None
        config = AutoConfig.for_model(**manifest["hf_config"])
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = hf_model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        hf_model.tie_weights()
        return hf_model.eval(), AutoTokenizer.from_pretrained(cache / "tokenizer")
    except Exception as error:  # any damage means: rebuild from the package
        log.warning("model cache %s is unusable (%s); rebuilding it", cache, error)
        return None


def _load_from_hub(name: str):
    from transformer_lens import HookedTransformer  # noqa: PLC0415
    from transformer_lens.loading_from_pretrained import get_official_model_name  # noqa: PLC0415

    try:
        get_official_model_name(name)
    except ValueError:
        raise ModelUnavailableError(
            f"unknown model name {name!r}: use one of the embedded models "
            f"{sorted(EMBEDDED_MODELS)} (offline), or a TransformerLens model name such as "
            f"'gpt2-xl' (downloads weights)"
        ) from None
    return HookedTransformer.from_pretrained_no_processing(name, dtype=torch.float32)


def _require_package(spec: EmbeddedModel) -> None:
    try:
        importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"model {spec.name!r} needs the package {spec.package!r}, which is not installed. "
            f"Install it with: {spec.install}"
        ) from None



_WEIGHTS = "weights.safetensors"
_MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_embedded(spec: EmbeddedModel, cache: Path, *, rebuild: bool):
    """The cached HookedTransformer, or one built from the GGUF file (and cached)."""
    _require_package(spec)

    def build():
        model, tokenizer, _ = _build_from_gguf(spec, cache)
        _write_cache(spec, cache, model, tokenizer)
        return model

    return _read_or_build(cache, lambda: _read_cache(spec, cache), build, rebuild=rebuild)


def _read_or_build(cache: Path, read, build, *, rebuild: bool):
    """``read()`` the cache folder, or ``build()`` it once: a process that finds another one
    building waits for it (``.lock``) and reads what it wrote, rather than building a
    second copy.  ``read`` returns None when the cache is missing or unusable."""
    seen = _manifest_stamp(cache)
    if not rebuild:
        found = read()
        if found is not None:
            return found
    with _build_lock(cache):
        if not rebuild and _manifest_stamp(cache) != seen:  # another process wrote it meanwhile
            found = read()
            if found is not None:
                return found
        return build()


def _manifest_stamp(cache: Path) -> int | None:
    """When the cache's manifest was last replaced (ns), or None without one."""
    try:
        return (cache / _MANIFEST).stat().st_mtime_ns
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """Hold the exclusive lock of one model's cache folder (where ``fcntl`` exists)."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # Windows: no lock; concurrent first loads each build a copy
        yield
        return
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_files(spec: EmbeddedModel, cache: Path) -> tuple[dict | None, dict]:
    """The manifest and the checked weights of a cache folder (``(None, {})`` without one);
    raises ``ValueError`` on any damage."""
    from safetensors.torch import load_file  # noqa: PLC0415

    manifest_path = cache / _MANIFEST
    if not manifest_path.exists():
        return None, {}
    manifest = json.loads(manifest_path.read_text())
    weights = cache / _WEIGHTS
    if manifest.get("format") != CACHE_FORMAT or manifest.get("name") != spec.name:
        raise ValueError("cache written by another version")
    if weights.stat().st_size != manifest["weights_bytes"]:
        raise ValueError(f"{weights} has {weights.stat().st_size} bytes, expected {manifest['weights_bytes']}")
    if _sha256(weights) != manifest["weights_sha256"]:
        raise ValueError(f"{weights} does not match its checksum")
    return manifest, load_file(weights)


def _write_files(cache: Path, state: dict[str, torch.Tensor], tokenizer, manifest: dict) -> None:
    """Write weights, tokenizer and manifest (last: the folder is valid only with it)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        weights = staging / _WEIGHTS
        save_file(state, str(weights))
        tokenizer.save_pretrained(staging / "tokenizer")
        manifest = {**manifest, "weights_bytes": weights.stat().st_size,
                    "weights_sha256": _sha256(weights)}
        (cache / _MANIFEST).unlink(missing_ok=True)  # invalid until every file is in place
        shutil.rmtree(cache / "tokenizer", ignore_errors=True)
        os.replace(staging / "tokenizer", cache / "tokenizer")
        os.replace(weights, cache / _WEIGHTS)
        manifest_tmp = staging / _MANIFEST
        manifest_tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(manifest_tmp, cache / _MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_cache(spec: EmbeddedModel, cache: Path):
    """The cached HookedTransformer, or None (with a log line saying why) when it must be rebuilt."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        manifest, state = _read_files(spec, cache)
        if manifest is None:
            return None
        cfg = HookedTransformerConfig(**_config_from_json(manifest["config"]))
        tokenizer = AutoTokenizer.from_pretrained(cache / "tokenizer")
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        model.load_state_dict(state, strict=True)
        return model
    except Exception as error:  # any damage means: rebuild from the package
        log.warning("model cache %s is unusable (%s); rebuilding it", cache, error)
        return None


def _write_cache(spec: EmbeddedModel, cache: Path, model, tokenizer) -> None:
    _write_files(cache, {k: v.contiguous() for k, v in model.state_dict().items()}, tokenizer, {
        "format": CACHE_FORMAT,
        "name": spec.name,
        "config": adapter_for(model).state.memo["constructor_config"],
    })


def _hf_from_gguf(spec: EmbeddedModel, cache: Path):
    """The tokenizer and the float32 Hugging Face model, dequantised from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    gguf = spec.locate_gguf(cache)
    log.info("building %s from %s (first load; cached afterwards)", spec.name, gguf)
    with _one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    hf_model.config.quantization_config = None
    del hf_model.config.quantization_config
    hf_model.config.architectures = [spec.architecture]
    return tokenizer, hf_model


def _build_from_gguf(spec: EmbeddedModel, cache: Path):
    """Dequantise the GGUF file and convert it to a TransformerLens model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: PLC0415
    from transformer_lens.loading_from_pretrained import convert_hf_model_config  # noqa: PLC0415

    tokenizer, hf_model = _hf_from_gguf(spec, cache)
    with tempfile.TemporaryDirectory() as config_dir:
        hf_model.config.save_pretrained(config_dir)
        config = convert_hf_model_config(spec.transformer_lens_name or config_dir)
    config.update(
        model_name=spec.name,
        tokenizer_name=None,
        default_prepend_bos=spec.prepend_bos,
        dtype="float32",
        device="cpu",
        init_weights=False,
        d_vocab=hf_model.config.vocab_size,
    )
    config.pop("quantization_method", None)
    cfg = HookedTransformerConfig(**_config_from_json(_constructor_config(config)))
    state_dict = _WEIGHT_CONVERSIONS[spec.architecture](hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    adapter_for(model).state.memo["constructor_config"] = _constructor_config(config)
    return model, tokenizer, hf_model


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Parse each GGUF file once while transformers reads it three times.

    ``from_pretrained`` of a tokenizer and a model reads the file's config
    (twice) and its tensors, and each read parses every metadata field anew: for
    Gemma's 262k-token vocabulary a parse takes about half a minute.  Within
    this block the reader of a path and its metadata are kept and reused (the
    metadata as a fresh copy per call, as callers may change it), and the
    reader slices the mapped file as a plain array: a slice of ``np.memmap``
    builds another memmap object, and the parse takes millions of slices.
    """
    import copy  # noqa: PLC0415

    import gguf  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from transformers import modeling_gguf_pytorch_utils as hf_gguf  # noqa: PLC0415

    reader_class, load_checkpoint = gguf.GGUFReader, hf_gguf.load_gguf_checkpoint

    class PlainArrayReader(reader_class):
        """``GGUFReader`` whose ``data`` is the read-only mapping as an ``np.ndarray`` view."""

        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    readers: dict[str, object] = {}
    metadata: dict[str, dict] = {}

    def reader(path, mode="r"):
        key = f"{os.fspath(path)}:{mode}"
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    def load(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs.get("model_to_load") is not None:
            return load_checkpoint(path, return_tensors=return_tensors, **kwargs)
        key = os.fspath(path)
        if key not in metadata:
            metadata[key] = load_checkpoint(path, return_tensors=False, **kwargs)
        return copy.deepcopy(metadata[key])

    gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = reader, load
    try:
        yield
    finally:
        gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = reader_class, load_checkpoint


def _convert_llama(hf_model, cfg):
    from transformer_lens.pretrained.weight_conversions.llama import (
        convert_llama_weights,  # noqa: PLC0415
    )

    return convert_llama_weights(hf_model, cfg)


def _convert_gemma(hf_model, cfg):
    from transformer_lens.pretrained.weight_conversions.gemma import (
        convert_gemma_weights,  # noqa: PLC0415
    )

    return convert_gemma_weights(hf_model, cfg)


_WEIGHT_CONVERSIONS = {"LlamaForCausalLM": _convert_llama, "Gemma3ForCausalLM": _convert_gemma}


def _constructor_config(config: dict) -> dict:
    """The JSON-safe arguments of ``HookedTransformerConfig`` in ``config``."""
    import dataclasses  # noqa: PLC0415

    from transformer_lens import HookedTransformerConfig  # noqa: PLC0415

    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    out = {}
    for key, value in config.items():
        if key not in fields:
            continue
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        out[key] = value
    return out


def _config_from_json(config: dict) -> dict:
    return {**config, "dtype": getattr(torch, config.get("dtype", "float32"))}
