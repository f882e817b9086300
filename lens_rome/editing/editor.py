"""The editor interface: what the evaluation runner asks of an editing method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from lens_rome.editing.weights import WeightEdit
    from lens_rome.model.backend import Model


@runtime_checkable
class Editor(Protocol):
    """An editing method.

    ``apply`` edits the model in place for one request, ``apply_batch`` for
    several (the changes made, oldest first, to revert in reverse order); each
    change's ``revert()`` restores the exact bits.  ``describe`` gives the
    method's name and settings (JSON-ready).
    """

    name: str

    def apply(self, model: Model, request: Any) -> WeightEdit: ...

    def apply_batch(self, model: Model, requests: Sequence[Any]) -> list[WeightEdit]: ...

    def describe(self) -> dict: ...


class OneAtATime:
    """For an editor without a batch update: ``apply_batch`` edits the requests one by one."""

    name: str

    def apply(self, model: Model, request: Any) -> WeightEdit:
        raise NotImplementedError

    def apply_batch(self, model: Model, requests: Sequence[Any]) -> list[WeightEdit]:
        """One edit per request, in order, each on top of the ones before.  If an edit
        fails, those already made are reverted before the error propagates."""
        changes = []
        try:
            for request in requests:
                changes.append(self.apply(model, request))
        except BaseException:
            for change in reversed(changes):
                change.revert()
            raise
        return changes

    def describe(self) -> dict:
        return {"method": self.name}


class PartialEditor(OneAtATime):
    """An :class:`Editor` made of an object that has only ``name`` and
    ``apply(model, request)`` (and perhaps ``describe()``)."""

    def __init__(self, method: Any):
        self.method, self.name = method, method.name

    def apply(self, model: Model, request: Any) -> WeightEdit:
        return self.method.apply(model, request)

    def describe(self) -> dict:
        describe = getattr(self.method, "describe", None)
        return describe() if describe is not None else super().describe()


def as_editor(method: Any) -> Editor:
    """``method`` itself if it is a whole :class:`Editor`, else a :class:`PartialEditor` of it."""
    return method if isinstance(method, Editor) else PartialEditor(method)
