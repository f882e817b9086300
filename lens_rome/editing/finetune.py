"""Fine-tuning baselines: FT and FT-L (the paper's constrained fine-tuning)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from lens_rome.data.requests import EditRequest
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.model.adapter import adapter_for

METHODS = ("rome", "r-rome", "memit", "alphaedit", "ft", "ft-l", "none")



class NoChange:
    """What ``none`` returns: nothing to revert."""

    info: dict = {}

    def revert(self) -> None:
        pass


class WeightChange:
    """A fine-tuned change to one layer's ``W_out``; ``revert()`` restores the original bits."""

    def __init__(self, model: HookedTransformer, layer: int, original: torch.Tensor,
                 info: dict | None = None):
        self.model, self.layer, self.original = model, layer, original
        self.info = info or {}

    @property
    def applied(self) -> bool:
        return self.original is not None

    def weight_delta(self) -> torch.Tensor:
        """The change ``W_out - W_out(original)``, ``[d_mlp, d_model]``."""
        if not self.applied:
            raise RuntimeError("this change is reverted")
        return adapter_for(self.model).w_out(self.layer).detach() - self.original

    def revert(self) -> None:
        if not self.applied:
            raise RuntimeError("this change is already reverted")
        with torch.no_grad():
            adapter_for(self.model).w_out(self.layer).copy_(self.original)
        self.original = None

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
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"norm_constraint must be > 0 or None, got {self.norm_constraint!r}")


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


class FineTune:
    """``ft`` and ``ft-l``: Adam on one layer's ``W_out`` for the edit prompt's target."""

    def __init__(self, model: HookedTransformer, params: FineTuneParams | None = None, *,
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
                raise TypeError(f"unknown fine-tuning options {unknown}; "
                                f"accepted: {sorted(fields)}")
            params = FineTuneParams(**{**defaults, **{k: v for k, v in overrides.items()
                                                      if v is not None}})
        if constrained and params.norm_constraint is None:
            raise ValueError("ft-l needs norm_constraint > 0 (the L-infinity radius)")
        adapter_for(model).check_layer(params.layer)
        self.params = params
        self.name = "ft-l" if params.norm_constraint is not None else "ft"

    def describe(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self.params)}

    def apply(self, model: HookedTransformer, request) -> WeightChange:
        request = EditRequest.parse(request)
        p = self.params
        adapter = adapter_for(model)
        weight = adapter.w_out(p.layer)
        original = weight.detach().clone()
        prompt = adapter.tokenize(request.text)[0][0].tolist()
        target = model.tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
        tokens = torch.tensor([prompt + target[:-1]], device=model.cfg.device)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
        target_ids = torch.tensor(target, device=model.cfg.device)
        with torch.no_grad():  # the blocks below the tuned layer do not change
            resid = model(tokens, stop_at_layer=p.layer)
        optimiser = torch.optim.Adam([weight], lr=p.lr)
        trainable = weight.requires_grad
        losses = []
        try:
            weight.requires_grad_(True)
            for _ in range(p.steps):
                with torch.enable_grad():
                    logits = model(resid, start_at_layer=p.layer)[0, positions]
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
        except BaseException:
            with torch.no_grad():
                weight.copy_(original)
            raise
        finally:
            weight.grad = None
            weight.requires_grad_(trainable)
        return WeightChange(model, p.layer, original, {"losses": losses})
