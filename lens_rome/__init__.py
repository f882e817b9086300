"""lens_rome: causal tracing and ROME fact editing on TransformerLens hook points.

Names load lazily (PEP 562): ``import lens_rome`` imports neither torch nor
TransformerLens until a name that needs them is used.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from lens_rome import _moved

try:
    __version__ = importlib.metadata.version("lens_rome")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    "DEFAULT_MODEL": "lens_rome.model.embedded",
    "ModelAdapter": "lens_rome.model.adapter",
    "adapter_for": "lens_rome.model.adapter",
    "load_model": "lens_rome.model.loading",
    "TraceResult": "lens_rome.tracing.result",
    "locate_subject": "lens_rome.tracing.subject",
    "trace": "lens_rome.tracing.engine",
    "trace_all": "lens_rome.tracing.engine",
    "trace_many": "lens_rome.tracing.engine",
    "attribute": "lens_rome.tracing.attribution",
    "verify": "lens_rome.tracing.verify",
    "trace_dataset": "lens_rome.tracing.dataset",
    "EditRequest": "lens_rome.data.requests",
    "RomeHyperParams": "lens_rome.editing.hparams",
    "evaluate": "lens_rome.evaluation.runner",
}
_SUBPACKAGES = ("cli", "data", "editing", "evaluation", "model", "tracing", "views")

__all__ = sorted([*_EXPORTS, *_SUBPACKAGES])

_moved.install()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES or name in _moved.MOVED_NAMES:
        value = importlib.import_module(f"lens_rome.{name}")
    else:
        raise AttributeError(f"module 'lens_rome' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for editors and type checkers; never executed
    from lens_rome.data.requests import EditRequest
    from lens_rome.editing.hparams import RomeHyperParams
    from lens_rome.evaluation.runner import evaluate
    from lens_rome.model.adapter import ModelAdapter, adapter_for
    from lens_rome.model.embedded import DEFAULT_MODEL
    from lens_rome.model.loading import load_model
    from lens_rome.tracing.attribution import attribute
    from lens_rome.tracing.dataset import trace_dataset
    from lens_rome.tracing.engine import trace, trace_all, trace_many
    from lens_rome.tracing.result import TraceResult
    from lens_rome.tracing.subject import locate_subject
    from lens_rome.tracing.verify import verify
