"""Weights stored in the memory order ``F.linear`` wants, so no per-call copies."""

from __future__ import annotations

import torch

from lens_rome.model.backend import Model

# Each weight that TransformerLens hands to ``F.linear`` through a transpose or
# rearrange followed by ``.contiguous()``, with the view that gives the
# ``[out, in]`` matrix ``F.linear`` wants, and its inverse.
_LINEAR_VIEWS = {
    "W_in": (lambda w: w.T, lambda m: m.T),
    "W_gate": (lambda w: w.T, lambda m: m.T),
    "W_out": (lambda w: w.T, lambda m: m.T),
    "W_U": (lambda w: w.T, lambda m: m.T),
    "W_Q": ("heads_in", None),
    "W_K": ("heads_in", None),
    "W_V": ("heads_in", None),
    "_W_K": ("heads_in", None),
    "_W_V": ("heads_in", None),
    "W_O": ("heads_out", None),
}


def use_linear_layout(model: Model) -> Model:
    """Store weights so that TransformerLens' per-call weight copies cost nothing.

    TransformerLens computes e.g. ``F.linear(x, W_in.T.contiguous())``: a copy
    of the weight on every forward pass, which dominates small-batch runs on a
    CPU.  Here every such weight keeps its shape and values but lives in the
    ``[out, in]`` memory order, so the transpose is already contiguous and the
    copy is skipped.  Values, shapes, names and results are unchanged.
    """
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or name not in _LINEAR_VIEWS:
                continue
            module._parameters[name] = torch.nn.Parameter(
                _relaid(name, param.data), requires_grad=param.requires_grad
            )
    return model


def _relaid(name: str, weight: torch.Tensor) -> torch.Tensor:
    view, inverse = _LINEAR_VIEWS[name]
    if view == "heads_in":  # [head, d_model, d_head] used as [(head d_head), d_model]
        heads, d_model, d_head = weight.shape
        matrix = weight.permute(0, 2, 1).reshape(heads * d_head, d_model).contiguous()
        return matrix.view(heads, d_head, d_model).permute(0, 2, 1)
    if view == "heads_out":  # [head, d_head, d_model] used as [d_model, (head d_head)]
        heads, d_head, d_model = weight.shape
        matrix = weight.reshape(heads * d_head, d_model).T.contiguous()
        return matrix.T.view(heads, d_head, d_model)
    return inverse(view(weight).contiguous())
