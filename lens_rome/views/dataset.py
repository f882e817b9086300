"""Dataset averages drawn as the paper's Figure 2 line plots, with bootstrap bands."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from matplotlib.figure import Figure

from lens_rome.tracing.kinds import CATEGORIES
from lens_rome.views.trace import COLORMAPS


class DatasetLike(Protocol):
    """What the plots read of a :class:`lens_rome.tracing.dataset.DatasetTrace`."""

    kinds: list[str]
    n_layers: int
    n_facts: int
    settings: dict

    def total_effect(self) -> dict[str, float]: ...

    def average(self, kind: str, sever: str = "none", *, n_boot: int = 1000, seed: int = 0): ...

KIND_COLORS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
KIND_TITLES = {"hidden": "single restored layer", "mlp": "MLP, window", "attn": "attention, window"}


def plot_dataset_effects(result: DatasetLike, n_boot: int = 1000) -> Figure:
    """The paper's Figure 2 for a :class:`lens_rome.tracing.dataset.DatasetTrace`.

    Top row: average indirect effect ``[category, layer]`` per kind (heatmaps);
    bottom row: the AIE at the last subject token and at the last token across
    layers, shaded with the 95% bootstrap interval.
    """
    kinds = result.kinds
    fig = Figure(figsize=(4.2 * len(kinds), 6.4), dpi=150, layout="constrained")
    axes = fig.subplots(2, len(kinds), squeeze=False, height_ratios=[1.1, 1])
    te = result.total_effect()
    for column, kind in enumerate(kinds):
        averages = result.average(kind, n_boot=n_boot)
        present = [c for c in CATEGORIES if c in set(averages["category"])]
        grid = (averages.pivot(index="category", columns="layer", values="aie")
                .reindex(present).to_numpy())
        ax = axes[0, column]
        image = ax.imshow(grid, cmap=COLORMAPS[kind], vmin=0, aspect="auto",
                          interpolation="nearest")
        ax.set_yticks(range(len(present)), present if column == 0 else [""] * len(present))
        ax.set_xticks(range(0, result.n_layers, 5))
        ax.set_title(f"AIE, {KIND_TITLES[kind]}", fontsize="medium")
        fig.colorbar(image, ax=ax)

        ax = axes[1, column]
        for category, style in (("last subject token", "-"), ("last token", "--")):
            rows = averages[averages["category"] == category]
            ax.plot(rows["layer"], rows["aie"], style, color=KIND_COLORS[kind], label=category)
            ax.fill_between(rows["layer"], rows["low"], rows["high"], color=KIND_COLORS[kind],
                            alpha=0.2, linewidth=0)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("layer" if kind == "hidden" else f"centre of a {result.settings.get('window', 10)}-layer window")
        ax.set_ylabel("average indirect effect" if column == 0 else "")
        ax.legend(fontsize="small", frameon=False)
    fig.suptitle(f"{result.settings.get('model', '')}: causal effects averaged over "
                 f"{te['n_facts']} facts (ATE {te['total_effect']:.3f}; shaded: 95% interval)",
                 fontsize="medium")
    return fig


def plot_dataset_severed(result: DatasetLike, n_boot: int = 1000) -> Figure:
    """The paper's Figure 3: hidden-state AIE at the last subject token per layer, plain
    and with the MLP or attention outputs of that token severed (95% intervals)."""
    fig = Figure(figsize=(9, 3.4), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    width = 0.28
    variants = [("none", "no severing", "tab:purple"), ("mlp", "MLP severed", "tab:green"),
                ("attn", "attention severed", "tab:red")]
    for offset, (sever, label, color) in enumerate(variants):
        averages = result.average("hidden", sever, n_boot=n_boot)
        rows = averages[averages["category"] == "last subject token"]
        x = rows["layer"].to_numpy() + (offset - 1) * width
        error = np.stack([rows["aie"] - rows["low"], rows["high"] - rows["aie"]])
        ax.bar(x, rows["aie"], width, color=color, label=label, yerr=error,
               error_kw={"linewidth": 0.6, "ecolor": "0.3"})
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("layer of the restored hidden state at the last subject token")
    ax.set_ylabel("average indirect effect")
    ax.set_xticks(range(0, result.n_layers, 5))
    ax.legend(frameon=False, fontsize="small")
    ax.set_title(f"{result.settings.get('model', '')}: severing MLP or attention at the last "
                 f"subject token ({result.n_facts} facts)", fontsize="medium")
    return fig
