"""The model seam: loading models, the adapter that alone knows their layout, fast blocks, precision."""

from typing import TYPE_CHECKING

from lens_rome._lazy import lazy_exports

_EXPORTS = {  # module -> the names this package takes from it
    ".adapter": ("BridgeAdapter", "ModelAdapter", "adapter_for", "model_fingerprint"),
    ".backend": ("BACKENDS", "DEFAULT_BACKEND", "Model"),
    ".embedded": ("DEFAULT_MODEL", "EMBEDDED_MODELS", "default_cache_dir"),
    ".hooks": ("Hook", "HookFn", "attached"),
    ".loading": ("load_hf_model", "load_model"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from lens_rome.model.adapter import (
        BridgeAdapter,
        ModelAdapter,
        adapter_for,
        model_fingerprint,
    )
    from lens_rome.model.backend import BACKENDS, DEFAULT_BACKEND, Model
    from lens_rome.model.embedded import (
        DEFAULT_MODEL,
        EMBEDDED_MODELS,
        default_cache_dir,
    )
    from lens_rome.model.hooks import Hook, HookFn, attached
    from lens_rome.model.loading import load_hf_model, load_model
