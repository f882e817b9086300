"""Writing files a user keeps: never silently replaced, never left half-written.

Also the two kinds of file lens_rome writes more than once: tensors with JSON
metadata (saved edits, key statistics; safetensors), and the ``run.json`` that
lets a stopped run resume only with the settings it started with.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from lens_rome.errors import SavedFileError

RUN_FILE = "run.json"

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


def check_resumable(out: str | Path, settings: Mapping[str, Any],
                    stored: Mapping[str, Any] | None, *, fix: str = "choose another out_dir"
                    ) -> bool:
    """Whether ``out`` holds an earlier run with the same ``settings`` (JSON-ready).

    ``stored``: the settings the earlier run recorded in its run file (None: no
    earlier run, False is returned).  Settings that differ raise
    :class:`~lens_rome.errors.SavedFileError` naming them, and ``fix``.
    """
    if stored is None:
        return False
    now = json.loads(json.dumps(settings))
    if dict(stored) == now:
        return True
    differ = sorted(k for k in {*stored, *now} if stored.get(k) != now.get(k))
    raise SavedFileError(
        f"{out} holds results of another run, with other settings ({', '.join(differ)}: "
        f"{ {k: stored.get(k) for k in differ} } there, { {k: now.get(k) for k in differ} } "
        f"now); resume with the same settings or {fix}")


def save_tensors(path: str | Path, tensors: Mapping[str, Any], meta_key: str,
                 meta: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``tensors`` (name -> tensor) as safetensors, ``meta`` as JSON under ``meta_key``,
    atomically; ``FileExistsError`` if ``path`` exists and ``overwrite`` is false."""
    # lazy: safetensors.torch imports torch, and storage is a light leaf
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    with replacing(path, overwrite=overwrite) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp),
                  metadata={meta_key: json.dumps(meta)})
    return path


def read_tensors(path: str | Path, meta_key: str) -> tuple[dict, dict[str, Any]]:
    """The JSON metadata under ``meta_key`` and every tensor of a :func:`save_tensors` file.

    Raises whatever reading raises (``KeyError`` when ``meta_key`` is absent).
    """
    from safetensors import safe_open  # noqa: PLC0415 (lazy, as above)

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[meta_key])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
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
