"""Pictures of traces: paper-style heatmaps, inline circuitsvis views, dataset averages."""

from typing import TYPE_CHECKING

from lens_rome._lazy import lazy_exports

_EXPORTS = {  # module -> the names this package takes from it
    ".dataset": ("plot_dataset_effects", "plot_dataset_severed"),
    ".trace": ("TraceView", "plot_trace", "show_trace"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from lens_rome.views.dataset import plot_dataset_effects, plot_dataset_severed
    from lens_rome.views.trace import TraceView, plot_trace, show_trace
