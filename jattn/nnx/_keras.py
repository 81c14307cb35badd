"""Reading Keras 3 weights (``MultiHeadAttention``, ``LayerNormalization``) without importing Keras.

A source is either a built Keras layer (anything with ``get_weights``) or the
list its ``get_weights()`` returns. Keras's ``attention_output`` projection is
called ``out`` here, as in Flax.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._fields import ModuleFields

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
    names: tuple[str, ...]
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


def mha_configuration(source: Any) -> dict[str, Any]:
    """The ``MultiHeadAttention`` constructor arguments that reproduce a Keras layer (sizes from the weight shapes)."""
    arrays, options = mha_arrays(source)
    in_features, num_heads, head_dim = arrays["query/kernel"].shape
    return dict(
        num_heads=num_heads,
        in_features=in_features,
        head_dim=head_dim,
        value_head_dim=arrays["value/kernel"].shape[2],
        out_features=arrays["out/kernel"].shape[2],
        in_kv_features=arrays["key/kernel"].shape[0],
        use_bias="query/bias" in arrays,
        dropout_rate=options.get("dropout_rate", 0.0),
    )


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


class KerasMethods(ModuleFields):
    """``from_keras`` / ``load_keras_weights`` of ``MultiHeadAttention`` (Keras 3 weights in, no Keras import)."""

    @classmethod
    def from_keras(
        cls,
        source: Any,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Any:
        """A module with the configuration and weights of a Keras 3 ``keras.layers.MultiHeadAttention``.

        The sizes come from the weight shapes, so ``source`` may be the built
        layer or its ``get_weights()`` list (8 arrays, or 4 without biases);
        from a layer the dropout rate is copied too. The Keras call
        ``layer(q, v, k, attention_mask=m, use_causal_mask=c)`` corresponds to
        ``module(q, k, v, mask=m[:, None], is_causal=c)`` (a mask row that hides
        every key gives zeros here, Keras's softmax gives uniform weights).

        Args:
            source: a built Keras ``MultiHeadAttention`` layer or its weights list.
            dtype: computation dtype (see the class).
            param_dtype: parameter dtype; the Keras arrays are cast to it.
            implementation: passed to ``jattn.dot_product_attention``.
            rngs: for the dropout stream; default ``nnx.Rngs(0)``.

        Raises:
            ValueError: an unbuilt layer, Keras features jattn lacks (gating,
                sliding window, custom attention axes), a weights list of the
                wrong length or shapes.

        Example:
            >>> import numpy as np
            >>> from jattn import nnx as jnnx
            >>> rng = np.random.default_rng(0)
            >>> shapes = [(16, 2, 8), (2, 8), (16, 2, 8), (2, 8), (16, 2, 8), (2, 8), (2, 8, 16), (16,)]
            >>> weights = [rng.normal(size=s).astype(np.float32) for s in shapes]  # layer.get_weights()
            >>> mha = jnnx.MultiHeadAttention.from_keras(weights)
            >>> mha.num_heads, mha.head_dim, mha.out_features
            (2, 8, 16)
        """
        build: Any = cls  # MultiHeadAttention: this mixin's class does not know its constructor
        module = build(
            **mha_configuration(source),
            dtype=dtype,
            param_dtype=param_dtype,
            implementation=implementation,
            rngs=nnx.Rngs(0) if rngs is None else rngs,
        )
        module.load_keras_weights(source)
        return module

    def load_keras_weights(self, source: Any) -> None:
        """Copies the weights of a Keras 3 ``MultiHeadAttention`` (layer or ``get_weights()`` list) into this module.

        Raises:
            ValueError: if a weight's shape differs from this module's parameter,
                or biases are present on one side only.

        Example:
            >>> import numpy as np
            >>> from flax import nnx
            >>> from jattn import nnx as jnnx
            >>> mha = jnnx.MultiHeadAttention(2, 16, head_dim=8, use_bias=False, rngs=nnx.Rngs(0))
            >>> shapes = [(16, 2, 8), (16, 2, 8), (16, 2, 8), (2, 8, 16)]  # use_bias=False: kernels only
            >>> mha.load_keras_weights([np.ones(s, np.float32) for s in shapes])
            >>> float(mha.out.kernel[...].sum())
            256.0
        """
        arrays, _ = mha_arrays(source)
        params = {
            f"{name}/{kind}": getattr(getattr(self, name), kind)
            for name in ("query", "key", "value", "out")
            for kind in ("kernel", "bias")
        }
        has_bias = "query/bias" in arrays
        if has_bias != self.use_bias:
            raise ValueError(
                f"the Keras weights {'have' if has_bias else 'lack'} biases "
                f"but this module has use_bias={self.use_bias}"
            )
        for name, array in arrays.items():
            expected = params[name].shape
            if array.shape != expected:
                raise ValueError(f"Keras weight {name} must have shape {expected} for this module; got {array.shape}")
        for name, array in arrays.items():
            params[name].set_value(jnp.asarray(array, self.param_dtype))
