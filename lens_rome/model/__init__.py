"""The model seam: loading models, the adapter that alone knows their layout, fast blocks, precision."""

from lens_rome.model.adapter import ModelAdapter, adapter_for, model_fingerprint
from lens_rome.model.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, default_cache_dir
from lens_rome.model.hooks import Hook, HookFn, attached
from lens_rome.model.loading import load_model

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "Hook", "HookFn", "ModelAdapter", "adapter_for",
    "attached", "default_cache_dir", "load_model", "model_fingerprint",
]
