"""safe_layers: drop-in Caffe Python layers and tools that keep training from dying of NaN/Inf.

The layer classes are exported here so a prototxt can say
``python_param { module: "safe_layers" layer: "NaNGuard" }``. They are imported on first
use, so ``safe_layers.kernels`` and the tools work without pycaffe.
"""

__version__ = "0.1.0"

_LAYERS = {
    "NaNGuard": "safe_layers.layers.nan_guard",
    "GradientClip": "safe_layers.layers.gradient_clip",
    "SafeInfogainLoss": "safe_layers.layers.safe_infogain_loss",
    "StableBatchNorm": "safe_layers.layers.stable_batch_norm",
}

# Anomaly mode: safe_layers.watch(solver, ...) (the package is safe_layers.anomaly, so
# that no submodule named "watch" can shadow the function).
_TOOLS = {
    "watch": "safe_layers.anomaly",
    "NonFiniteError": "safe_layers.anomaly",
}

__all__ = sorted(_LAYERS) + sorted(_TOOLS)


def __getattr__(name):
    module = _LAYERS.get(name) or _TOOLS.get(name)
    if module is None:
        raise AttributeError("module 'safe_layers' has no attribute %r" % name)
    import importlib
    return getattr(importlib.import_module(module), name)
