"""Writing files a user keeps: never silently replaced, never left half-written.

Also the two kinds of file lens_rome writes more than once: tensors with JSON
metadata (saved edits, key statistics; safetensors), checksummed so that damage
is found when they are read, and the ``run.json`` that lets a stopped run resume
only with the settings (and the inputs, by content hash) it started with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from lens_rome.errors import ChecksumError, SavedFileError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# The safetensors metadata key of a file's tensor checksum (see tensors_sha256).
CHECKSUM_KEY = "lens_rome_sha256"

T = TypeVar("T")


@contextlib.contextmanager
def replacing(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to, renamed onto ``path`` if the block succeeds.

    Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically, replacing an earlier file."""
    with replacing(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def content_hash(data: Any) -> str:
    """A short sha256 of JSON-ready ``data`` (keys sorted): what ties a run to its inputs."""
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_resumable(out: str | Path, settings: Mapping[str, Any],
                    stored: Mapping[str, Any] | None, *, fix: str = "choose another out_dir",
                    unrecorded: Iterable[str] = ()) -> bool:
    """Whether ``out`` holds an earlier run with the same ``settings`` (JSON-ready).

    ``stored``: the settings the earlier run recorded in its run file (None: no
    earlier run, False is returned).  Settings that differ raise
    :class:`~lens_rome.errors.SavedFileError` naming them, and ``fix``.
    ``unrecorded``: settings that runs of older versions did not record (such as
    the dataset's hash); a stored run without them resumes, with a warning that
    they cannot be checked.
    """
    if stored is None:
        return False
    now = json.loads(json.dumps(settings))
    missing = [k for k in unrecorded if k in now and k not in stored]
    if missing:
        log.warning("%s was started by an older lens_rome that did not record %s: they cannot "
                    "be checked; resuming as if they were the same", out, ", ".join(missing))
        now = {k: v for k, v in now.items() if k not in missing}
    if dict(stored) == now:
        return True
    differ = sorted(k for k in {*stored, *now} if stored.get(k) != now.get(k))
    raise SavedFileError(
        f"{out} holds results of another run, with other settings ({', '.join(differ)}: "
        f"{ {k: stored.get(k) for k in differ} } there, { {k: now.get(k) for k in differ} } "
        f"now); resume with the same settings or {fix}")


def check_same_items(out: str | Path, stored: Mapping[str, str] | None,
                     now: Mapping[str, str], *, what: str, fix: str) -> dict[str, str]:
    """The content hashes of a run's items (``item id -> hash``: cases, facts) merged with
    those given now.

    ``stored``: the hashes the run file recorded (None: a run of an older version,
    which recorded none: a warning says its items cannot be checked).  An id in
    both with another hash means another dataset that reuses the ids: raises
    :class:`~lens_rome.errors.SavedFileError` naming them, and ``fix``.
    """
    now = {str(k): v for k, v in now.items()}
    if stored is None:
        log.warning("%s was started by an older lens_rome that did not record its %ss' "
                    "contents: they cannot be checked against the %ss given now", out, what, what)
        return now
    changed = sorted((k for k in now if k in stored and stored[k] != now[k]), key=_natural)
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5
                                          else "")
        raise SavedFileError(
            f"{out} holds results for {what}s with the same ids but other contents ({what} "
            f"{shown}): it was run on another dataset; {fix}")
    return {**stored, **now}


def _natural(key: str) -> tuple:
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def save_tensors(path: str | Path, tensors: Mapping[str, Any], meta_key: str,
                 meta: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``tensors`` (name -> tensor) as safetensors, ``meta`` as JSON under ``meta_key``,
    atomically; ``FileExistsError`` if ``path`` exists and ``overwrite`` is false."""
    # lazy: safetensors.torch imports torch, and storage is a light leaf
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    with replacing(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={meta_key: json.dumps(meta),
                                               CHECKSUM_KEY: tensors_sha256(tensors)})
    return path


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    import torch  # noqa: PLC0415 (lazy: storage is a light leaf)

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_UNVERIFIED: set[str] = set()  # files already warned about, one warning each


def read_tensors(path: str | Path, meta_key: str) -> tuple[dict, dict[str, Any]]:
    """The JSON metadata under ``meta_key`` and every tensor of a :func:`save_tensors` file,
    after checking the tensors against the file's checksum.

    Raises :class:`ChecksumError` when they do not match; a file written before
    lens_rome wrote checksums is read with a warning that it cannot be verified.
    Otherwise raises whatever reading raises (``KeyError`` when ``meta_key`` is absent).
    """
    from safetensors import safe_open  # noqa: PLC0415 (lazy, as above)

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        meta = json.loads(metadata[meta_key])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None:
        if str(path) not in _UNVERIFIED:
            _UNVERIFIED.add(str(path))
            log.warning("%s was written before lens_rome checksummed its files: its tensors "
                        "cannot be verified (save it again to add a checksum)", path)
    elif tensors_sha256(tensors) != expected:
        raise ChecksumError("its tensors do not match the checksum written with them: the "
                            "file is damaged")
    return meta, tensors


def load_saved(path: str | Path, meta_key: str, version: int, what: str,
               build: Callable[[dict, dict[str, Any]], T]) -> T:
    """``build(meta, tensors)`` of a file :func:`save_tensors` wrote with ``meta["format"]``
    equal to ``version``.

    ``FileNotFoundError`` passes through; any other failure (a damaged file,
    another format, ``build`` refusing it) raises
    :class:`~lens_rome.errors.SavedFileError`: "``path`` is not a readable ``what``".
    """
    path = Path(path)
    try:
        meta, tensors = read_tensors(path, meta_key)
        if meta.get("format") != version:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        return build(meta, tensors)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise SavedFileError(f"{path} is not a readable {what}: {error}") from None


def metadata_keys(path: str | Path) -> set[str]:
    """The metadata keys of a safetensors file (which kind of saved object it holds).

    Raises :class:`~lens_rome.errors.SavedFileError` when it is not a readable one.
    """
    from safetensors import safe_open  # noqa: PLC0415 (lazy, as above)

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.metadata() or {})
    except Exception as error:
        raise SavedFileError(f"{path} is not a readable lens_rome edit: {error}") from None
