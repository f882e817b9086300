"""Where a trace's files go, and the check that none is overwritten unasked (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

DEFAULT_OUT = "lens_rome_out"
EXTENSIONS = ("png", "html", "json")


def trace_stem(kind: str, sever: str | None = None, method: str = "exact") -> str:
    """The file name stem of a trace: ``trace_hidden``, ``trace_hidden_sever_mlp``, or
    ``attribution_hidden`` for an attribution estimate."""
    prefix = "trace" if method == "exact" else method
    return f"{prefix}_{kind}" if sever is None else f"{prefix}_{kind}_sever_{sever}"


def trace_paths(out: str | Path, kind: str, sever: str | None = None,
                method: str = "exact") -> dict[str, Path]:
    """The files a trace of ``kind`` is written to: ``{"png": ..., "html": ..., "json": ...}``."""
    stem = trace_stem(kind, sever, method)
    return {ext: Path(out) / f"{stem}.{ext}" for ext in EXTENSIONS}


def verify_path(out: str | Path, kind: str) -> Path:
    """Where ``--verify`` writes the exact restorations of an estimate's top sites."""
    return Path(out) / f"attribution_{kind}_verify.json"


def check_free(paths: Iterable[Path]) -> None:
    """Raise ``FileExistsError`` naming the first of ``paths`` that already exists."""
    for path in paths:
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; pass --overwrite to replace it (or choose another --out)"
            )
