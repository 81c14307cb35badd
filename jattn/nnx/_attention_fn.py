"""The ``attention_fn`` hook of ``MultiHeadAttention``: a Flax-convention function in place of jattn's attention.

The function is called as ``flax.nnx.MultiHeadAttention`` calls its own: ``attention_fn(query, key, value,
mask=, dropout_rng=, dropout_rate=, broadcast_dropout=, deterministic=, dtype=, precision=, module=,
is_causal=)`` (and ``bias=`` when a call gives one), so ``flax.nnx.dot_product_attention`` and
``jattn.nnx.flax_attention_fn`` both fit. What such a function has no argument for is refused here, by
name, rather than silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxtyping import Array, Float

from jattn._options import CallOptions

# The call options a Flax-convention attention_fn is given; every other option of a call is refused.
PASSED_OPTIONS = ("bias", "mask", "is_causal")


def check_module_options(attention_fn: Callable | None, **options: Any) -> None:
    """Refuses module options that only jattn's own attention serves when ``attention_fn`` is given.

    ``options`` are the module's values; ``None`` and ``False`` mean "not used".

    Raises:
        TypeError: an ``attention_fn`` that is not callable.
        ValueError: an option in ``options`` that is used together with ``attention_fn``.
    """
    if attention_fn is None:
        return
    if not callable(attention_fn):
        raise TypeError(f"attention_fn must be a callable or None; got {type(attention_fn).__name__}")
    for name, value in options.items():
        if value is not None and value is not False:
            raise ValueError(
                f"{name} cannot be combined with attention_fn: it configures jattn's own attention, which "
                f"attention_fn replaces; got {name}={value!r} (pass attention_fn=None, or bind jattn's options "
                "into the function, e.g. functools.partial(jattn.nnx.flax_attention_fn, block_q=...))"
            )


def check_call_options(call: CallOptions, *, return_weights: bool) -> None:
    """Refuses what a Flax-convention ``attention_fn`` cannot be given: ``return_weights`` and call options
    other than ``mask``, ``bias`` and ``is_causal``.

    Raises:
        ValueError: naming the option.
    """
    if return_weights:
        raise ValueError(
            "return_weights=True cannot be combined with attention_fn: the weights are jattn's own "
            "attention's; got return_weights=True (pass attention_fn=None to get them)"
        )
    for name in CallOptions.__dataclass_fields__:
        if name not in PASSED_OPTIONS and getattr(call, name) is not None:
            raise ValueError(
                f"{name} cannot be given to a MultiHeadAttention with attention_fn: Flax's calling convention "
                f"passes only {', '.join(PASSED_OPTIONS)}; got {name} (pass attention_fn=None to use it)"
            )


def call_attention_fn(
    attention_fn: Callable,
    query: Float[Array, "batch q_seq heads dim"],
    key: Float[Array, "batch kv_seq kv_heads dim"],
    value: Float[Array, "batch kv_seq kv_heads v_dim"],
    call: CallOptions,
    *,
    dropout_key: Array | None,
    dropout_rate: float,
    dtype: Any,
) -> Float[Array, "batch q_seq heads v_dim"]:
    """``attention_fn`` called as ``flax.nnx.MultiHeadAttention`` calls it (see the module docstring).

    ``call`` has passed :func:`check_call_options`. ``dropout_key`` is None when dropout is off; then
    ``deterministic=True``, as Flax passes it. Dropout is per weight (``broadcast_dropout=False``), as in
    jattn's own path.
    """
    bias = {} if call.bias is None else {"bias": call.bias}
    return attention_fn(
        query,
        key,
        value,
        **bias,
        mask=call.mask,
        dropout_rng=dropout_key,
        dropout_rate=dropout_rate,
        broadcast_dropout=False,
        deterministic=dropout_key is None,
        dtype=dtype,
        precision=None,
        module=None,
        is_causal=call.is_causal,
    )
