"""``dot_product_attention`` and ``auto_implementation``: check, choose, run. No maths here."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from . import _checks, _dispatch, _numerics
from ._dispatch import Implementation
from ._mesh import like_query, whole_sequences
from ._options import CallOptions, Execution, option_names
from ._prepare import clipped_lengths, prepare
from ._reference import WeightsHook, reference_attention
from ._sequence_parallel import SequenceParallel
from .masks import _block_mask


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
    score_mod: Callable[..., Array] | None = None,
    mask_mod: Callable[..., Array] | None = None,
    block_mask: _block_mask.BlockMask | None = None,
    sinks: Float[ArrayLike, " heads"] | None = None,
    implementation: Implementation | None = None,
    return_residual: bool = False,
    block_q: int | None = None,
    block_kv: int | None = None,
    sequence_parallel: SequenceParallel | None = None,
) -> (
    Float[Array, "*batch q_seq heads v_dim"]
    | tuple[Float[Array, "*batch q_seq heads v_dim"], Float[Array, "*batch q_seq heads"]]
):
    r"""Scaled dot-product attention; a drop-in for ``jax.nn.dot_product_attention``.

    For each head, ``softmax(score_mod(cap(scale * Q K^T) + bias), masked) V``. Axis legend::

        batch   examples: any number of leading axes (none, one, several), the same on every argument
        q_seq   query positions         kv_seq    key/value positions
        heads   query heads             kv_heads  key/value heads (divides heads)
        dim     query/key features      v_dim     value features

    Masks are boolean with True = attend, and every mask option is combined
    with AND. A query row that sees no key at all returns zeros (and zero
    gradients); ``jax.nn.dot_product_attention`` returns the mean of V there
    instead. Everywhere else the results agree.

    Args:
        query: ``(*batch, q_seq, heads, dim)``, e.g. ``(batch, q_seq, heads, dim)``
            or ``(q_seq, heads, dim)``.
        key: ``(batch, kv_seq, kv_heads, dim)``; ``heads % kv_heads == 0``
            (grouped-query attention, K/V are never repeated).
        value: ``(batch, kv_seq, kv_heads, v_dim)``.
        bias: optional float added to the logits, broadcastable to
            ``(*batch, heads, q_seq, kv_seq)``; as in ``jax.nn``, missing leading
            axes count as 1 (``(kv_seq,)``, ``(q_seq, kv_seq)``, ...).
        mask: optional boolean, same shape rules as ``bias``.
        scale: logit multiplier; ``None`` means ``1/sqrt(dim)``.
        is_causal: query ``i`` sees keys ``j <= i``.
        query_seq_lengths: int ``(*batch,)``: queries at or past it see nothing
            and return zeros.
        key_value_seq_lengths: int ``(*batch,)``: keys at or past it are hidden.
        local_window_size: ``(left, right)`` or one int for both: query ``i``
            sees keys ``i - left <= j <= i + right``.
        query_segment_ids: int ``(*batch, q_seq)``; with
            ``key_value_segment_ids`` (``(*batch, kv_seq)``), query ``i`` sees key
            ``j`` only where their ids are equal (packed sequences).
        key_value_segment_ids: see ``query_segment_ids``; give both or neither.
        logits_soft_cap: optional ``c > 0``: scaled logits become
            ``c * tanh(logits / c)`` before the bias (Gemma 2).
        score_mod: optional ``score_mod(score, batch, head, q_idx, kv_idx) ->
            score`` (FlexAttention), applied elementwise to the logits in the
            softmax dtype after scale, soft cap and bias; int32 indices, ``batch``
            the flat example index. It may capture arrays (``jattn.score_mods``:
            ALiBi slopes, a position-bias table): gradients and tangents reach
            them through every implementation jattn computes.
        mask_mod: optional ``mask_mod(batch, head, q_idx, kv_idx) -> bool`` (or
            a ``jattn.masks`` position predicate), ANDed with every other mask.
            The blockwise kernel visits only blocks with a visible position.
        block_mask: ``jattn.masks.block_mask(mask_mod, ...)`` built once for this
            ``mask_mod`` (and reused across layers); without one the blockwise
            kernel builds it on every call. Its block sizes win over
            ``block_q``/``block_kv``.
        sinks: optional float ``(heads,)``: a learned logit per head that joins
            every row's softmax denominator but has no value (attention sinks,
            gpt-oss); differentiable.
        implementation: ``None`` (auto: see :func:`jattn.auto_implementation`),
            ``"reference"``
            (the per-example core vmapped over batch and heads, materializing
            each head's logits), ``"blockwise"`` (O(N)-memory online softmax
            with its own backward pass, skipping masked blocks), ``"xla"`` or
            ``"cudnn"`` (delegate to ``jax.nn.dot_product_attention``, which
            lacks segment ids, soft-capping and ``v_dim != dim``).
        return_residual: also return the log-sum-exp of each query's logits
            ``(*batch, q_seq, heads)``, computed in float32 (float64 for float64
            inputs) and returned in the input dtype, as ``jax.nn`` does; it
            carries no derivative (as in ``jax.nn``). A row that sees no key
            gets the dtype's lowest finite value.
        block_q: query block size of the blockwise kernel; None: the backend's
            default (``jattn.DEFAULT_BLOCK_SIZES``, 512 everywhere today), clipped to q_seq.
            When that does not divide q_seq, the largest divisor of q_seq that
            is at least half of it is used instead, if any, so nothing is padded.
        block_kv: key/value block size of the blockwise kernel, clipped and
            fitted to kv_seq the same way (padding K/V would copy them whole,
            e.g. a KV cache on every decode step).
        sequence_parallel: a :class:`jattn.sharding.SequenceParallel` to run
            sequence-parallel (ring or all-gather K/V) over a mesh axis the
            sequence is sharded along: to force a strategy, use the zigzag
            layout, or name the axis on ``Auto`` mesh axes. ``None``: a query
            whose sequence axis is sharded over an ``Explicit`` mesh axis runs
            sequence-parallel anyway (auto strategy, contiguous layout), unless
            the call has a ``score_mod``, ``mask_mod`` or ``sinks`` (then the
            sequence is gathered). Blockwise only; see :mod:`jattn.sharding`.

    Returns:
        ``(*batch, q_seq, heads, v_dim)`` in the input dtype (the query's batch
        axes, or none), plus the log-sum-exp if ``return_residual``.

    Raises:
        TypeError: non-floating or mixed q/k/v dtypes, non-boolean mask,
            non-floating bias, non-integer lengths or segment ids, a non-numeric
            scale or soft cap.
        ValueError: wrong ranks, mismatched sizes, ``heads % kv_heads != 0``,
            mask/bias/lengths/segment ids of the wrong shape, a negative window,
            an unknown implementation or an option it cannot honour, a
            non-positive block size, a ``sequence_parallel`` the call cannot
            honour (no such mesh axis, sequences that do not split evenly, a
            mod or sinks, an implementation other than blockwise).

    Every JAX transform works on every implementation: reverse mode, forward
    mode (``jax.jvp``, ``jax.jacfwd``: blockwise and O(N) memory on
    ``"blockwise"``) and their compositions (Hessians, HVPs, grad of grad).

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
    call = CallOptions(
        bias=bias,
        mask=mask,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        query_segment_ids=query_segment_ids,
        key_value_segment_ids=key_value_segment_ids,
        scale=scale,
        is_causal=is_causal,
        local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap,
        score_mod=score_mod,
        mask_mod=mask_mod,
        block_mask=block_mask,
        sinks=sinks,
    )
    return attend(
        query,
        key,
        value,
        call,
        implementation=implementation,
        return_residual=return_residual,
        block_q=block_q,
        block_kv=block_kv,
        sequence_parallel=sequence_parallel,
    )


def attend(
    query,
    key,
    value,
    call: CallOptions,
    *,
    implementation: Implementation | None = None,
    return_residual: bool = False,
    block_q: int | None = None,
    block_kv: int | None = None,
    sequence_parallel: SequenceParallel | None = None,
    kv_cache: bool = False,
):
    """``dot_product_attention`` with its options as one record (what ``jattn.nnx`` calls; see ``Execution``)."""
    execution = Execution(implementation, block_q, block_kv, sequence_parallel, return_residual, kv_cache)
    return run_prepared(prepare(query, key, value, call), execution)


def run_prepared(prepared, execution: Execution):
    """A checked call, run as ``execution`` says: the output, and the log-sum-exp if asked for."""
    _checks.check_positive_int("block_q", execution.block_q, allow_none=True)
    _checks.check_positive_int("block_kv", execution.block_kv, allow_none=True)
    sp = execution.sequence_parallel
    if sp is not None and not isinstance(sp, SequenceParallel):
        raise TypeError(f"sequence_parallel must be a jattn.sharding.SequenceParallel or None; got {sp!r}")
    where = _dispatch.route(prepared, execution)
    if _dispatch.is_empty(prepared.inputs):  # nothing to attend over, or nothing asks: jattn's rule everywhere
        out, lse = _dispatch.empty_result(prepared.inputs)
    else:
        out, lse = _dispatch.run_route(prepared, where, execution)
    out = prepared.restore(out)
    if not execution.return_residual:
        return out
    return out, prepared.restore(_numerics.residual(lse, out.dtype))


def attend_with_weights(
    query, key, value, call: CallOptions, *, weights_hook: WeightsHook | None = None
) -> tuple[Float[Array, "*batch q_seq heads v_dim"], Float[Array, "*batch heads q_seq kv_seq"]]:
    """Output and weights ``(batch, heads, q_seq, kv_seq)`` (before the hook) through the materialized path.

    ``weights_hook`` (e.g. dropout) changes the weights before they meet V.
    """
    prepared = prepare(query, key, value, call)
    if _dispatch.is_empty(prepared.inputs):
        query, key = prepared.inputs.query, prepared.inputs.key
        out, _ = _dispatch.empty_result(prepared.inputs)
        weights = jnp.zeros((query.shape[0], query.shape[2], query.shape[1], key.shape[1]), out.dtype)
    else:
        inputs = whole_sequences(clipped_lengths(prepared.inputs))
        out, _, weights = reference_attention(inputs, weights_hook=weights_hook)
        out = like_query(out, prepared.inputs.query)
    return prepared.restore(out), prepared.restore(weights)


def auto_implementation(
    query: Float[ArrayLike, "*batch q_seq heads dim"] | jax.ShapeDtypeStruct,
    key: Float[ArrayLike, "*batch kv_seq kv_heads dim"] | jax.ShapeDtypeStruct,
    value: Float[ArrayLike, "*batch kv_seq kv_heads v_dim"] | jax.ShapeDtypeStruct,
    bias: Float[ArrayLike, "*#batch #heads #q_seq #kv_seq"] | jax.ShapeDtypeStruct | None = None,
    mask: Bool[ArrayLike, "*#batch #heads #q_seq #kv_seq"] | jax.ShapeDtypeStruct | None = None,
    *,
    backend: str | None = None,
    kv_cache: bool = False,
    **options,
) -> Implementation:
    """The implementation ``dot_product_attention(..., implementation=None)`` runs for these arguments.

    A pure function of the backend, the dtype, the shapes and which options are
    given (arrays may be ``jax.ShapeDtypeStruct``; nothing is computed):

    Only implementations that compute exactly what jattn defines are
    considered (the README's capability table; jax.nn's result is repaired
    where a query row sees no key, and segment ids reach it as a dense mask):

    * on GPU, ``"cudnn"`` (jax.nn's fused cuDNN kernel) in float16/bfloat16
      with a head dim of at most 128 and a multiple of 8, else ``"xla"``, else
      ``"reference"`` up to ``4 * 8 * 4096**2`` logits in all (batch x heads x
      q_seq x kv_seq; ``256**2`` per head with a ``mask_mod`` or ``block_mask``)
      over at most 4096 keys, else ``"blockwise"``;
    * on other non-CPU backends, ``"xla"``;
    * on CPU, ``"xla"`` for float32/bfloat16 sequences up to 1024, else
      ``"reference"`` for tiny problems (``q_seq * kv_seq <= 64**2`` over at
      most 1024 keys), else ``"blockwise"`` (one query over more than 4 MiB
      of keys: ``"blockwise"``; see ``kv_cache`` for ``jattn.nnx``'s steps);
    * ``"blockwise"`` (sequence-parallel) when the query's sequence axis is
      sharded over an ``Explicit`` mesh axis (see :mod:`jattn.sharding`).

    The thresholds are the crossovers ``python -m bench.auto_rule`` measured
    (``bench/results/auto-rule-cpu.json`` and ``-gpu.json``, see ``jattn._dispatch``).

    Args:
        query, key, value, bias, mask: as for :func:`jattn.dot_product_attention`.
        backend: ``"cpu"``, ``"gpu"``, ``"tpu"``; default ``jax.default_backend()``.
        kv_cache: what a ``jattn.nnx`` decode step over the module's KV cache runs instead (on CPU,
            ``"reference"`` in a form reading the cache as it lies, where ``jax.nn`` copies it).
        **options: the keyword options of :func:`jattn.dot_product_attention`
            (``is_causal``, lengths, segment ids, ``local_window_size``, ...).

    Returns:
        ``"reference"``, ``"blockwise"``, ``"xla"`` or ``"cudnn"``.

    Raises:
        TypeError, ValueError: the errors ``dot_product_attention`` raises for
            these arguments, and an unknown option name.

    Example:
        >>> import jax, jax.numpy as jnp, jattn
        >>> q = jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.float32)
        >>> jattn.auto_implementation(q, q, q, is_causal=True, backend="cpu")
        'blockwise'
        >>> jattn.auto_implementation(q, q, q, is_causal=True, backend="gpu")
        'xla'
        >>> jattn.auto_implementation(q.update(dtype=jnp.bfloat16), q.update(dtype=jnp.bfloat16),
        ...                           q.update(dtype=jnp.bfloat16), backend="gpu")
        'cudnn'
        >>> token, cache = q.update(shape=(1, 1, 8, 64)), q.update(shape=(1, 1024, 8, 64))
        >>> [jattn.auto_implementation(token, cache, cache, backend="cpu", kv_cache=c) for c in (False, True)]
        ['xla', 'reference']
    """
    array_names = set(option_names(static=False)) - {"bias", "mask"}
    unknown = set(options) - array_names - set(option_names(static=True))
    if unknown:
        raise TypeError(f"auto_implementation got unexpected options {sorted(unknown)}")
    arrays = {k: v for k, v in options.items() if k in array_names}
    static = {k: v for k, v in options.items() if k not in array_names}
    chosen = []

    def trace(qkv, bias, mask, arrays):
        prepared = prepare(*qkv, CallOptions(bias=bias, mask=mask, **arrays, **static))
        chosen.append(_dispatch.route(prepared, Execution(kv_cache=kv_cache), backend).implementation)

    jax.eval_shape(trace, (query, key, value), bias, mask, arrays)
    return chosen[0]
