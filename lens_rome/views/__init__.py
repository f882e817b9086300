"""Pictures of traces: paper-style heatmaps, inline circuitsvis views, dataset averages."""

from lens_rome.views.dataset import plot_dataset_effects, plot_dataset_severed
from lens_rome.views.trace import TraceView, plot_trace, show_trace

__all__ = ["TraceView", "plot_dataset_effects", "plot_dataset_severed", "plot_trace", "show_trace"]
