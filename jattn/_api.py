"""``dot_product_attention``: argument checks, layout, dispatch. No maths here."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from . import _checks, _core
from ._blockwise import blockwise_attention
from ._options import AttentionOptions
from ._reference import reference_attention

IMPLEMENTATIONS = ("reference", "blockwise", "xla", "cudnn")
Implementation = Literal["reference", "blockwise", "xla", "cudnn"]


def dot_product_attention(
    query: Float[ArrayLike, "*batch q_seq heads dim"],
    key: Float[ArrayLike, "*batch kv_seq kv_heads dim"],
    value: Float[ArrayLike, "*batch kv_seq kv_heads v_dim"],
    bias: Float[ArrayLike, "*#batch #heads #q_seq #kv_seq"] | None = None,
    mask: Bool[ArrayLike, "*#batch #heads #q_seq #kv_seq"] | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Int[ArrayLike, "*batch"] | None = None,
    key_value_seq_lengths: Int[ArrayLike, "*batch"] | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    query_segment_ids: Int[ArrayLike, "*batch q_seq"] | None = None,
    key_value_segment_ids: Int[ArrayLike, "*batch kv_seq"] | None = None,
    logits_soft_cap: float | None = None,
    implementation: Implementation | None = None,
    return_residual: bool = False,
    block_q: int = 512,
    block_kv: int = 512,
) -> (
    Float[Array, "*batch q_seq heads v_dim"]
    | tuple[Float[Array, "*batch q_seq heads v_dim"], Float[Array, "*batch q_seq heads"]]
):
    r"""Scaled dot-product attention; a drop-in for ``jax.nn.dot_product_attention``.

    For each head, ``softmax(scale * Q K^T + bias, masked) V``. Axis legend::

        batch   examples (optional: drop it from every argument)
        q_seq   query positions         kv_seq    key/value positions
        heads   query heads             kv_heads  key/value heads (divides heads)
        dim     query/key features      v_dim     value features

    Masks are boolean with True = attend, and every mask option is combined
    with AND. A query row that sees no key at all returns zeros (and zero
    gradients); ``jax.nn.dot_product_attention`` returns the mean of V there
    instead. Everywhere else the results agree.

    Args:
        query: ``(batch, q_seq, heads, dim)`` or ``(q_seq, heads, dim)``.
        key: ``(batch, kv_seq, kv_heads, dim)``; ``heads % kv_heads == 0``
            (grouped-query attention, K/V are never repeated).
        value: ``(batch, kv_seq, kv_heads, v_dim)``.
        bias: optional float added to the logits, rank 4 and broadcastable to
            ``(batch, heads, q_seq, kv_seq)`` (rank 3 without batch).
        mask: optional boolean, same shape rules as ``bias``.
        scale: logit multiplier; ``None`` means ``1/sqrt(dim)``.
        is_causal: query ``i`` sees keys ``j <= i``.
        query_seq_lengths: int ``(batch,)``: queries at or past it see nothing
            and return zeros.
        key_value_seq_lengths: int ``(batch,)``: keys at or past it are hidden.
        local_window_size: ``(left, right)`` or one int for both: query ``i``
            sees keys ``i - left <= j <= i + right``.
        query_segment_ids: int ``(batch, q_seq)``; with
            ``key_value_segment_ids`` (``(batch, kv_seq)``), query ``i`` sees key
            ``j`` only where their ids are equal (packed sequences).
        key_value_segment_ids: see ``query_segment_ids``; give both or neither.
        logits_soft_cap: optional ``c > 0``: scaled logits become
            ``c * tanh(logits / c)`` before the bias (Gemma 2).
        implementation: ``None`` (auto, see ``auto_implementation``:
            ``"xla"`` for small problems jax.nn computes exactly,
            ``"reference"`` for tiny ones, else ``"blockwise"``), ``"reference"``
            (the per-example core vmapped over batch and heads, materializing
            each head's logits), ``"blockwise"`` (O(N)-memory online softmax
            with its own backward pass, skipping masked blocks), ``"xla"`` or
            ``"cudnn"`` (delegate to ``jax.nn.dot_product_attention``, which
            lacks segment ids, soft-capping and ``v_dim != dim``).
        return_residual: also return the log-sum-exp of each query's logits
            ``(batch, q_seq, heads)`` in float32 (float64 for float64 inputs);
            it carries no gradient (as in ``jax.nn``).
        block_q: query block size of the blockwise kernel, clipped to q_seq.
            When that does not divide q_seq, the largest divisor of q_seq that
            is at least half of it is used instead, if any, so nothing is padded.
        block_kv: key/value block size of the blockwise kernel, clipped and
            fitted to kv_seq the same way (padding K/V would copy them whole,
            e.g. a KV cache on every decode step).

    Returns:
        ``(batch, q_seq, heads, v_dim)`` in the input dtype (no batch axis if
        the query had none), plus the log-sum-exp if ``return_residual``.

    Raises:
        TypeError: non-floating or mixed q/k/v dtypes, non-boolean mask,
            non-floating bias, non-integer lengths or segment ids, a non-numeric
            scale or soft cap.
        ValueError: wrong ranks, mismatched sizes, ``heads % kv_heads != 0``,
            mask/bias/lengths/segment ids of the wrong shape, a negative window,
            an unknown implementation or an option it cannot honour, a
            non-positive block size.

    ``jax.jvp`` (forward mode) is not available for ``"blockwise"`` (it has a
    custom VJP); use ``implementation="reference"`` for forward-mode autodiff.
    Reverse mode, including grad of grad, works for every implementation.

    Example:
        >>> import jax, jax.numpy as jnp, jattn
        >>> q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8), jnp.float32)  # (batch, q_seq, heads, dim)
        >>> kv = jax.random.normal(jax.random.key(1), (2, 7, 2, 8), jnp.float32)  # 2 kv heads: GQA
        >>> out = jattn.dot_product_attention(q, kv, kv, is_causal=True)
        >>> out.shape
        (2, 5, 4, 8)
        >>> ref = jax.nn.dot_product_attention(q, kv, kv, is_causal=True)
        >>> bool(jnp.allclose(out, ref, atol=1e-5))
        True
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.check_floating(name, x)
    _checks.check_same_dtype(query=query, key=key, value=value)
    _checks.check_rank("query", query, (3, 4), "(batch, q_seq, heads, dim) or (q_seq, heads, dim)")
    batched = query.ndim == 4
    lead, lead_axes = (query.shape[:1], "(batch, ") if batched else ((), "(")
    kv_axes, v_axes = lead_axes + "kv_seq, kv_heads, dim)", lead_axes + "kv_seq, kv_heads, v_dim)"
    _checks.check_rank("key", key, (query.ndim,), kv_axes + " like query")
    _checks.check_rank("value", value, (query.ndim,), v_axes + " like query")
    *_, q_seq, heads, dim = query.shape
    kv_seq, kv_heads, v_dim = key.shape[-3], key.shape[-2], value.shape[-1]
    _checks.check_shape("key", key, (*lead, kv_seq, kv_heads, dim), kv_axes)
    _checks.check_shape("value", value, (*lead, kv_seq, kv_heads, v_dim), v_axes)
    if heads % kv_heads:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (kv_heads); got heads={heads}, kv_heads={kv_heads}"
        )
    if not batched:
        query, key, value = query[None], key[None], value[None]
    batch = query.shape[0]

    logits_shape = (batch, heads, q_seq, kv_seq)
    bias = _batched_logits_operand("bias", bias, logits_shape, batched, _checks.check_floating)
    mask = _batched_logits_operand("mask", mask, logits_shape, batched, _checks.check_bool)

    _core.check_scale(scale)
    _core.check_soft_cap(logits_soft_cap)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a Python bool; got {type(is_causal).__name__}")
    opts = AttentionOptions(
        scale=_core.default_scale(dim) if scale is None else float(scale),
        is_causal=bool(is_causal),
        local_window_size=_window(local_window_size),
        query_seq_lengths=_lengths("query_seq_lengths", query_seq_lengths, batch, batched),
        key_value_seq_lengths=_lengths("key_value_seq_lengths", key_value_seq_lengths, batch, batched),
        query_segment_ids=_segment_ids("query_segment_ids", query_segment_ids, (batch, q_seq), batched),
        key_value_segment_ids=_segment_ids("key_value_segment_ids", key_value_segment_ids, (batch, kv_seq), batched),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
    )
    if (opts.query_segment_ids is None) != (opts.key_value_segment_ids is None):
        raise ValueError("query_segment_ids and key_value_segment_ids must be given together; got only one")

    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"{name} must be a positive int; got {block!r}")
    if implementation is None:
        exact = _exact_with_jax_nn(q_seq, kv_seq, dim, v_dim, mask, opts)
        implementation = auto_implementation(q_seq, kv_seq, exact_with_jax_nn=exact, dtype=query.dtype)

    match implementation:
        case "reference":
            out, lse = reference_attention(query, key, value, bias, mask, opts)
        case "blockwise":
            out, lse = blockwise_attention(query, key, value, bias, mask, opts, block_q=block_q, block_kv=block_kv)
        case "xla" | "cudnn":
            out, lse = _jax_nn(query, key, value, bias, mask, opts, implementation, return_residual)
        case _:
            raise ValueError(f"implementation must be one of {(None, *IMPLEMENTATIONS)}; got {implementation!r}")

    lse = jax.lax.stop_gradient(lse)
    if not batched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out


def auto_implementation(
    q_seq: int, kv_seq: int, *, exact_with_jax_nn: bool = False, dtype=jnp.float32
) -> Implementation:
    """The implementation ``implementation=None`` picks (documented rule).

    * Small problems (``q_seq * kv_seq <= 128 * 128``) go to ``"xla"`` when
      ``jax.nn`` computes exactly what jattn would (``exact_with_jax_nn``: no
      option it lacks, and no query row that could see no key) in float32 or
      bfloat16 (jax.nn runs float64 softmax in float32). At these sizes
      XLA's fused attention beat the blockwise loop in ``bench/`` (batch 32,
      N=128 on CPU).
    * Otherwise tiny problems (``q_seq * kv_seq <= 64 * 64``) over at most
      1024 keys go to ``"reference"``, where the blockwise loop's bookkeeping
      is comparable to the maths. Past 1024 keys a few queries (a decode step)
      go blockwise, which skips the key blocks past ``key_value_seq_lengths``:
      one token over a 4096-position cache filled to 64 took 1.3 ms blockwise
      and 5.3 ms dense on the CPU of ``bench/``.
    * Everything else goes to ``"blockwise"``: it honours every option and was
      faster than XLA's attention from a few hundred positions up.

    cuDNN is never picked automatically.

    Example:
        >>> from jattn._api import auto_implementation
        >>> auto_implementation(4096, 4096), auto_implementation(8, 8), auto_implementation(1, 2048)
        ('blockwise', 'reference', 'blockwise')
    """
    # jax.nn runs float64 softmax in float32, and has no float16 dot on CPU.
    if q_seq * kv_seq <= 128 * 128 and exact_with_jax_nn and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16):
        return "xla"
    return "reference" if q_seq * kv_seq <= 64 * 64 and kv_seq <= 1024 else "blockwise"


def _exact_with_jax_nn(q_seq, kv_seq, dim, v_dim, mask, opts: AttentionOptions) -> bool:
    """True when ``jax.nn.dot_product_attention`` gives jattn's results: it supports
    every option and no query row can be left without a visible key (where
    jax.nn returns mean(V) and jattn zeros)."""
    if mask is not None or v_dim != dim or opts.logits_soft_cap is not None:
        return False
    if any(a is not None for a in opts.per_example_arrays()):
        return False
    # Causal rows always see key 0; a window leaves row i its own key while q_seq <= kv_seq.
    return opts.local_window_size is None or q_seq <= kv_seq


def _batched_logits_operand(name, x, logits_shape, batched, check_dtype):
    """Checks a bias or mask and gives it a leading batch axis."""
    if x is None:
        return None
    x = jnp.asarray(x)
    check_dtype(name, x)
    if batched:
        _checks.check_broadcastable(name, x, logits_shape, "(batch, heads, q_seq, kv_seq)")
        return x
    if x.ndim == 4:  # jax.nn accepts a leading batch axis of 1 on unbatched calls
        _checks.check_broadcastable(name, x, logits_shape, "(1, heads, q_seq, kv_seq)")
        return x
    _checks.check_broadcastable(name, x, logits_shape[1:], "(heads, q_seq, kv_seq)")
    return x[None]


def _window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None

    def is_size(w):
        return isinstance(w, (int, np.integer)) and not isinstance(w, (bool, np.bool_)) and w >= 0

    window = (local_window_size,) * 2 if is_size(local_window_size) else local_window_size
    ok = isinstance(window, tuple) and len(window) == 2 and all(is_size(w) for w in window)
    if not ok:
        raise ValueError(
            f"local_window_size must be a non-negative int or a (left, right) tuple of them; got {local_window_size!r}"
        )
    return int(window[0]), int(window[1])


def _lengths(name, lengths, batch, batched) -> Array | None:
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    _checks.check_integer(name, lengths)
    if not batched and lengths.ndim == 0:
        lengths = lengths[None]
    _checks.check_shape(name, lengths, (batch,), "(batch,)")
    return lengths.astype(jnp.int32)


def _segment_ids(name, ids, shape, batched) -> Array | None:
    if ids is None:
        return None
    ids = jnp.asarray(ids)
    _checks.check_integer(name, ids)
    seq = "q_seq" if name.startswith("query") else "kv_seq"
    if batched:
        _checks.check_shape(name, ids, shape, f"(batch, {seq})")
    else:
        _checks.check_shape(name, ids, shape[1:], f"({seq},)")
        ids = ids[None]
    return ids.astype(jnp.int32)


def _jax_nn(query, key, value, bias, mask, opts: AttentionOptions, implementation, return_residual):
    """Delegates to ``jax.nn.dot_product_attention`` after refusing what it lacks."""
    unsupported = []
    if opts.query_segment_ids is not None:
        unsupported.append("query_segment_ids/key_value_segment_ids")
    if opts.logits_soft_cap is not None:
        unsupported.append("logits_soft_cap")
    if value.shape[-1] != query.shape[-1]:
        unsupported.append(f"v_dim != dim ({value.shape[-1]} != {query.shape[-1]})")
    if unsupported:
        raise ValueError(
            f"implementation={implementation!r} (jax.nn.dot_product_attention) does not support "
            f"{', '.join(unsupported)}; use implementation='reference' or None"
        )
    # jax.nn mixes int32 lengths with default-int positions; keep that working under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        result = jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            scale=opts.scale,
            is_causal=opts.is_causal,
            query_seq_lengths=opts.query_seq_lengths,
            key_value_seq_lengths=opts.key_value_seq_lengths,
            local_window_size=opts.local_window_size,
            implementation=implementation,
            return_residual=return_residual,
        )
    if not return_residual:  # the log-sum-exp costs an extra pass: ask only when wanted
        return result, jnp.zeros(result.shape[:-1], _core.compute_dtype(query.dtype))
    out, lse = result
    # jax.nn gives the log-sum-exp in the input dtype; jattn's is in the softmax dtype.
    return out, lse.astype(_core.compute_dtype(query.dtype))
