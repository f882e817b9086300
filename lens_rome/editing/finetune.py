"""Fine-tuning baselines: FT and FT-L (the paper's constrained fine-tuning)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lens_rome.checks import finite_number, finite_tensor, positive_int
from lens_rome.data.requests import EditRequest
from lens_rome.editing.editor import OneAtATime
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.weights import WeightEdit, record_change
from lens_rome.errors import InputError, WrongTypeError
from lens_rome.model.adapter import adapter_for
from lens_rome.model.backend import Model


@dataclass(frozen=True)
class FineTuneParams:
    """Fine-tuning one layer's ``W_out``.

    Attributes:
        layer: the MLP layer (default: ROME's edit layer for the model).
        steps, lr: Adam steps and learning rate (the paper's code: 25, 5e-4).
        norm_constraint: L-infinity radius of the change per weight (``ft-l``);
            None for plain ``ft``.
        early_stop_loss: stop once the target's mean NLL is below this.
    """

    layer: int
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float | None = None
    early_stop_loss: float = 1e-2

    def __post_init__(self):
        positive_int(self.steps, "steps")
        finite_number(self.lr, "lr", positive=True)
        if self.norm_constraint is not None:
            finite_number(self.norm_constraint, "norm_constraint (None: no constraint)",
                          positive=True)
        finite_number(self.early_stop_loss, "early_stop_loss", minimum=0)


# Per-model fine-tuning settings (see docs/evaluation.md).  The paper's code uses 25 Adam
# steps at lr 5e-4 and, for FT+L on GPT-2 XL, an L-inf radius of 5e-4.  SmolLM2's W_out
# at layer 5 has entries of standard deviation ~0.18; the radius below keeps FT-L's change
# to a few percent of that, which still lets most edits through on the edit prompt.
FT_DEFAULTS: dict[str, dict] = {
    "smollm2-135m": {"steps": 25, "lr": 5e-4},
    "gpt2-xl": {"steps": 25, "lr": 5e-4},
}
FT_L_DEFAULTS: dict[str, dict] = {
    "smollm2-135m": {"norm_constraint": 5e-3},
    "gpt2-xl": {"norm_constraint": 5e-4},
}
FT_L_FALLBACK = 5e-4


class FineTune(OneAtATime):
    """``ft`` and ``ft-l``: Adam on one layer's ``W_out`` for the edit prompt's target."""

    def __init__(self, model: Model, params: FineTuneParams | None = None, *,
                 constrained: bool = False, **overrides):
        name = adapter_for(model).name
        if params is None:
            defaults = {"layer": RomeHyperParams.for_model(model).layer,
                        **FT_DEFAULTS.get(name, {})}
            if constrained:
                defaults.update(FT_L_DEFAULTS.get(name, {"norm_constraint": FT_L_FALLBACK}))
            fields = {f.name for f in dataclasses.fields(FineTuneParams)}
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise WrongTypeError(f"unknown fine-tuning options {unknown}; "
                                f"accepted: {sorted(fields)}")
            params = FineTuneParams(**{**defaults, **{k: v for k, v in overrides.items()
                                                      if v is not None}})
        if constrained and params.norm_constraint is None:
            raise InputError("ft-l needs norm_constraint > 0 (the L-infinity radius)")
        adapter_for(model).check_layer(params.layer)
        self.params = params
        self.name = "ft-l" if params.norm_constraint is not None else "ft"

    def describe(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self.params)}

    def apply(self, model: Model, request) -> WeightEdit:
        """Tune ``W_out`` of the layer in place; the change records the loss of each step."""
        request = EditRequest.parse(request)
        p = self.params
        adapter = adapter_for(model)
        weight = adapter.w_out_parameter(p.layer)  # a leaf, in the backend's own layout
        original = weight.detach().clone()
        before = adapter.w_out(p.layer).detach().clone()  # [d_mlp, d_model], as edits record it
        prompt = adapter.tokenize(request.text)[0][0].tolist()
        target = model.tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
        tokens = adapter.as_tokens([prompt + target[:-1]])
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
        target_ids = adapter.as_tokens(target)
        upper_logits = adapter.upper_logits(tokens, p.layer)  # blocks below: once, no grads
        optimiser = torch.optim.Adam([weight], lr=p.lr)
        trainable = weight.requires_grad
        losses = []
        try:
            weight.requires_grad_(True)
            for _ in range(p.steps):
                with torch.enable_grad():
                    logits = upper_logits()[0, positions]
                    loss = -torch.log_softmax(logits.float(), -1)[
                        torch.arange(len(target)), target_ids].mean()
                    losses.append(float(loss.detach()))
                    if losses[-1] < p.early_stop_loss:
                        break
                    (weight.grad,) = torch.autograd.grad(loss, [weight])
                optimiser.step()
                weight.grad = None
                if p.norm_constraint is not None:
                    with torch.no_grad():
                        weight.copy_(torch.minimum(torch.maximum(
                            weight, original - p.norm_constraint), original + p.norm_constraint))
            finite_tensor(weight.detach(), f"W_out of layer {p.layer} after fine-tuning",
                          "the model is left as it was; lower lr")
        except BaseException:
            with torch.no_grad():
                weight.copy_(original)
            raise
        finally:
            weight.grad = None
            weight.requires_grad_(trainable)
        return record_change(model, {p.layer: before}, info={"losses": losses})
