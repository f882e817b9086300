"""Old import paths (lens_rome 0.1's flat modules) that still work, with a DeprecationWarning.

``import lens_rome.rome`` gives a stand-in module whose attributes come from
the modules the names moved to, warning once per name; TransformerLens'
``hook_points`` module ``__getattr__`` is the model.  They go in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

# old module -> the modules its public names now live in, searched in order
MOVED = {
    "rome": ("editing.rome", "editing.hparams", "editing.layout", "editing.weights",
             "editing.values", "editing.prefixes",
             "data.requests", "evaluation.measures"),
    "memit": ("editing.memit",),
    "hooks": ("tracing.interventions", "tracing.noise_rules", "model.hooks"),
    "models": ("model.loading", "model.adapter", "model.embedded", "model.layout"),
    "null_space": ("editing.null_space",),
    "statistics": ("editing.statistics", "data.corpus", "model.adapter"),
    "baselines": ("editing.registry", "editing.finetune"),
    "attribution": ("tracing.attribution", "tracing.verify"),
    "dataset_trace": ("tracing.dataset",),
    "distributed": ("tracing.distributed",),
    "datasets": ("data.cases", "data.known_facts"),
    "precision": ("model.precision",),
    "fast_blocks": ("model.fast_blocks",),
}
MOVED_NAMES = frozenset(MOVED)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("lens_rome.")
        if fullname.startswith("lens_rome.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        old = module.__name__
        targets = [f"lens_rome.{name}" for name in MOVED[old.removeprefix("lens_rome.")]]
        module.__doc__ = f"Moved: use {' or '.join(targets)} (this path goes in lens_rome 0.3)."

        def __getattr__(name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            found = [(target, getattr(importlib.import_module(target), name))
                     for target in targets if hasattr(importlib.import_module(target), name)]
            if found:  # name the module that defines it, not one that imports it
                target, value = next(((t, v) for t, v in found
                                      if getattr(v, "__module__", None) == t), found[0])
                warnings.warn(f"{old}.{name} moved to {target}.{name}; import it from "
                              f"there ({old} goes in lens_rome 0.3)",
                              DeprecationWarning, stacklevel=2)
                return value
            raise AttributeError(f"module {old!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__


def install() -> None:
    """Let the old paths import (once per process)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
