"""Hooks as ``(hook_name, fn)`` pairs, and attaching them for a block."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from transformer_lens.hook_points import HookPoint

from lens_rome.model.backend import Model

HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor]
Hook = tuple[str, HookFn]
Positions = int | Sequence[int] | slice




@contextlib.contextmanager
def attached(model: Model, fwd_hooks: Sequence[Hook]) -> Iterator[Model]:
    """Like ``model.hooks(fwd_hooks)``, but removes only its own hooks on exit.

    ``model.hooks`` resets every hook point of the model when it exits, which
    costs more than a transformer block on small inputs; this is cheap enough
    for inner loops, and leaves a user's own hooks in place.
    """
    handles = []
    try:
        for name, fn in fwd_hooks:
            point = model.hook_dict[name]
            handles.append(point.register_forward_hook(_calling(fn, point)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _calling(fn: HookFn, point: HookPoint):
    """A PyTorch forward hook that calls ``fn(activation, hook=point)`` as TransformerLens
    would: through the point's ``hook_conversion`` where it has one (a bridge's
    ``attn.o.hook_in`` shows ``[batch, pos, head, d_head]``, its module sees ``[batch, pos, d_model]``)."""
    conversion = getattr(point, "hook_conversion", None)
    if conversion is None:
        return lambda module, inputs, output: fn(output, hook=point)

    def converted(module, inputs, output):
        result = fn(conversion.convert(output), hook=point)
        return None if result is None else conversion.revert(result)

    return converted
