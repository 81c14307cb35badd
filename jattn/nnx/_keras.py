"""Reading Keras 3 weights (``MultiHeadAttention``, ``LayerNormalization``) without importing Keras.

A source is either a built Keras layer (anything with ``get_weights``) or the
list its ``get_weights()`` returns. Keras's ``attention_output`` projection is
called ``out`` here, as in Flax.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MHA_NAMES_WITH_BIAS = (
    "query/kernel",
    "query/bias",
    "key/kernel",
    "key/bias",
    "value/kernel",
    "value/bias",
    "out/kernel",
    "out/bias",
)
_MHA_NAMES = tuple(n for n in _MHA_NAMES_WITH_BIAS if n.endswith("kernel"))
_RANKS = {"kernel": 3, "query/bias": 2, "key/bias": 2, "value/bias": 2, "out/bias": 1}


def _variable_array(variable: Any) -> np.ndarray:
    """A Keras variable's value as NumPy (``.value`` avoids Keras's NumPy-2 ``__array__`` deprecation)."""
    try:
        return np.asarray(variable.value)
    except (TypeError, RuntimeError):  # e.g. a torch-backend tensor that requires grad
        return np.asarray(variable.numpy())


def _weights_of(source: Any, what: str) -> tuple[list[np.ndarray], dict]:
    config = {}
    if hasattr(source, "get_weights"):
        config = source.get_config()
        weights = [_variable_array(v) for v in source.weights]  # the order of get_weights()
        if not weights:
            raise ValueError(f"the Keras {what} layer has no weights yet; call it once (or build it) before loading")
    else:
        weights = list(source)
    return [np.asarray(w) for w in weights], config


def mha_arrays(source: Any) -> tuple[dict[str, np.ndarray], dict]:
    """Named arrays of a Keras ``MultiHeadAttention`` and the options jattn copies (``dropout_rate``)."""
    weights, config = _weights_of(source, "MultiHeadAttention")
    options = {}
    if config:
        if config.get("use_gate"):
            raise ValueError("Keras MultiHeadAttention with use_gate=True is not supported by jattn.nnx")
        if config.get("sliding_window") is not None:
            raise ValueError("Keras MultiHeadAttention with sliding_window is not supported by jattn.nnx")
        if config.get("attention_axes") not in (None, (1,), [1]):
            raise ValueError(
                f"Keras MultiHeadAttention must attend over axis 1 (attention_axes=None); "
                f"got attention_axes={config.get('attention_axes')}"
            )
        options["dropout_rate"] = float(config.get("dropout", 0.0))
    if len(weights) == 8:
        names = _MHA_NAMES_WITH_BIAS
    elif len(weights) == 4:
        names = _MHA_NAMES
    else:
        raise ValueError(
            "Keras MultiHeadAttention weights must be 8 arrays (query, key, value, attention_output: kernel, bias) "
            f"or 4 (kernels only, use_bias=False); got {len(weights)}"
        )
    arrays = dict(zip(names, weights, strict=True))
    for name, array in arrays.items():
        rank = _RANKS["kernel"] if name.endswith("kernel") else _RANKS[name]
        if array.ndim != rank:
            raise ValueError(f"Keras weight {name} must have rank {rank}; got shape {array.shape}")
    if arrays["key/kernel"].shape[0] != arrays["value/kernel"].shape[0]:
        raise ValueError(
            "Keras key and value inputs must have the same features for jattn.nnx; got key/kernel "
            f"{arrays['key/kernel'].shape} and value/kernel {arrays['value/kernel'].shape}"
        )
    return arrays, options


def layer_norm_arrays(source: Any) -> tuple[dict[str, np.ndarray], dict]:
    """``scale`` (gamma) and ``bias`` (beta) of a Keras ``LayerNormalization``, and its ``epsilon``."""
    weights, config = _weights_of(source, "LayerNormalization")
    options = {}
    if config:
        if config.get("rms_scaling"):
            raise ValueError("Keras LayerNormalization with rms_scaling=True is not supported by AttentionBlock")
        if not (config.get("center", True) and config.get("scale", True)):
            raise ValueError("Keras LayerNormalization must have center=True and scale=True for AttentionBlock")
        if config.get("axis", -1) not in (-1, [-1], (-1,)):
            raise ValueError(f"Keras LayerNormalization must normalize axis -1; got axis={config.get('axis')}")
        options["epsilon"] = float(config["epsilon"])
    if len(weights) != 2:
        raise ValueError(f"Keras LayerNormalization weights must be 2 arrays (gamma, beta); got {len(weights)}")
    return dict(zip(("scale", "bias"), weights, strict=True)), options
