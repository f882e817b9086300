"""Editing methods by name: ROME, r-ROME, MEMIT, AlphaEdit, fine-tuning, no edit.

Meng et al. (2022, section 4) compare ROME with fine-tuning one layer:

- ``ft``: Adam on ``W_out`` of one MLP layer to minimise
  ``-log P(target_new | rewrite prompt)`` (mean over the target's tokens,
  teacher-forced), for a fixed number of steps;
- ``ft-l`` (the paper's FT+L): the same, but after every step the change to
  ``W_out`` is clamped to an L-infinity ball of radius ``norm_constraint``
  around the original weights (5e-4 for GPT-2 XL in the paper);
- ``rome``: :func:`lens_rome.editing.rome.edit`;
- ``r-rome``: the same with r-ROME's update (``update_key="average"``, Gupta
  et al. 2024);
- ``memit``: :func:`lens_rome.editing.memit.edit`, a batch of requests over several layers;
- ``alphaedit``: the same with AlphaEdit's null-space update (``null_space=True``);
- ``none``: the unedited model, for reference rows.

:data:`EDITORS` maps each name to the factory of its :class:`~lens_rome.editing.editor.Editor`;
:func:`make_method` builds one by name.  ``method.apply(model, request)`` edits
the model in place and returns a change whose ``revert()`` puts back the
exact bits, so that every evaluation case starts from the unedited model::

    method = make_method("ft-l", model)
    change = method.apply(model, {"prompt": "{} is in", "subject": "The Louvre",
                                  "target_new": " Rome"})
    ...
    change.revert()

:func:`apply_batch` edits several requests at once: in one edit where the
method has a batch update (``memit``, ``alphaedit``), else one after another;
it returns the list of changes, to be reverted in reverse order.

This module imports no torch (the command line reads :data:`METHODS` to parse
its options); the editors' modules load when the first one is made.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Mapping

from lens_rome._lazy import lazy_exports
from lens_rome.editing.editor import Editor, as_editor
from lens_rome.errors import InputError, WrongTypeError

if TYPE_CHECKING:
    from lens_rome.editing.finetune import FineTune
    from lens_rome.editing.methods import MemitMethod, NoEdit, RomeMethod
    from lens_rome.editing.weights import WeightEdit
    from lens_rome.model.backend import Model

# the editor classes (``from lens_rome.editing.registry import NoEdit``), loaded at first use
_CLASSES = {".methods": ("NoEdit", "RomeMethod", "MemitMethod"), ".finetune": ("FineTune",)}
_, __getattr__, __dir__ = lazy_exports(__name__, _CLASSES)


def _rome(model: Model, **options: Any) -> Editor:
    from lens_rome.editing.methods import RomeMethod  # noqa: PLC0415 (torch, at the first editor)

    return RomeMethod(model, **options)


def _r_rome(model: Model, **options: Any) -> Editor:
    if options.get("update_key", "average") != "average":
        raise InputError("method 'r-rome' is ROME with update_key='average'; use method 'rome' "
                         "for the other update")
    return _rome(model, **{**options, "update_key": "average"})


def _memit(model: Model, **options: Any) -> Editor:
    from lens_rome.editing.methods import MemitMethod  # noqa: PLC0415 (torch, at the first editor)

    return MemitMethod(model, **options)


def _alphaedit(model: Model, **options: Any) -> Editor:
    if options.get("null_space", True) is not True:
        raise InputError("method 'alphaedit' is MEMIT with null_space=True; use method 'memit' "
                         "for MEMIT's own update")
    return _memit(model, **{**options, "null_space": True})


def _fine_tune(constrained: bool, model: Model, /, **options: Any) -> Editor:
    from lens_rome.editing.finetune import FineTune  # noqa: PLC0415 (torch, at the first editor)

    return FineTune(model, constrained=constrained, **options)


def _no_edit(model: Model, **options: Any) -> Editor:
    if options:
        raise WrongTypeError(f"method 'none' takes no options, got {sorted(options)}")
    from lens_rome.editing.methods import NoEdit  # noqa: PLC0415 (torch, at the first editor)

    return NoEdit()


# name -> factory(model, **options) of the editor
EDITORS: dict[str, Callable[..., Editor]] = {
    "rome": _rome,
    "r-rome": _r_rome,
    "memit": _memit,
    "alphaedit": _alphaedit,
    "ft": functools.partial(_fine_tune, False),
    "ft-l": functools.partial(_fine_tune, True),
    "none": _no_edit,
}
METHODS = tuple(EDITORS)


def make_method(name: str, model: Model, **options: Any) -> Editor:
    """The editing method ``name`` (one of :data:`METHODS`) for ``model``.

    ``options`` go to the method: ROME hyper-parameters (``hparams=...``,
    ``stats=...``, ``layer=...``, ``null_space=True``, ...), MEMIT ones
    (``layers=...``, ``mom2_weight=...``, ``stats={layer: ...}``, ...) or
    fine-tuning ones (``layer``, ``steps``, ``lr``, ``norm_constraint``,
    ``early_stop_loss``).
    """
    if name not in EDITORS:
        raise InputError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    return EDITORS[name](model, **options)


def method_name(method: Any) -> str:
    """The name of a method object or string (checked)."""
    if isinstance(method, str):
        if method not in EDITORS:
            raise InputError(f"unknown method {method!r}; expected one of {list(METHODS)}")
        return method
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not hasattr(method, "apply"):
        raise WrongTypeError(f"method must be one of {list(METHODS)} or an object with .name "
                             f"and .apply(model, request), got {method!r}")
    return name


def describe(method: Any) -> Mapping:
    """The method's name and settings: ``method.describe()``, or ``{"method": name}``."""
    return as_editor(method).describe()


def apply_batch(method: Any, model: Model, requests) -> list[WeightEdit]:
    """Apply ``requests`` with ``method``; the changes made, oldest first.

    One edit for methods with a batch update (MEMIT, AlphaEdit); otherwise
    one edit per request, in order, each on top of the ones before.  If an
    edit fails, those already made are reverted before the error propagates.
    """
    requests = list(requests)
    if not requests:
        raise InputError("the batch of edit requests is empty: give at least one request")
    return as_editor(method).apply_batch(model, requests)
