"""Which implementation runs a call (the auto rule), and running it.

:func:`route` is the one place a call's implementation is decided, for
``dot_product_attention`` and ``auto_implementation`` alike: a sequence-parallel
plan, an explicit ``implementation=`` checked against the capability table
(``_capabilities``), or the auto rule :func:`choose`. The rule is a pure function
of :class:`CallSignature` — backend, dtype, shapes and the capability-table
features the call uses — so its tests pass the backend explicitly and run on any
machine. It only considers implementations that honour every feature exactly;
its thresholds are measurements, each naming the ``bench/`` run and case that set it.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from . import _capabilities, _checks, _numerics, _one_query
from ._blockwise import blockwise_attention
from ._jax_nn import jax_nn_attention, repair_rows, with_segment_mask
from ._mesh import explicit_mesh, like_query, whole_sequences
from ._options import AttentionInputs, Execution
from ._prepare import Prepared, clipped_lengths
from ._reference import reference_attention
from ._sequence_parallel import SequencePlan, plan_sequence_parallel, run_per_shard, run_sequence_parallel
from ._tiling import default_block_size

IMPLEMENTATIONS: tuple[str, ...] = ("reference", "blockwise", "xla", "cudnn")
"""The names ``dot_product_attention(..., implementation=)`` takes (besides None, the auto rule)."""
Implementation = Literal["reference", "blockwise", "xla", "cudnn"]

# Thresholds of the CPU rule: the crossovers `python -m bench.auto_rule` recorded in
# bench/results/auto-rule-cpu.json (batch 4, 8 heads, head dim 64, float32 and bfloat16, forward and
# forward+backward, interleaved rounds); tests/test_auto_rule_evidence.py checks they agree.

XLA_MAX_SEQ = 1024
"""Up to this ``max(q_seq, kv_seq)`` auto delegates to ``jax.nn`` wherever it is exact: the longest
sequence at which the blockwise kernel was still more than 5% slower than jax.nn in some case (the
``xla_max_seq`` crossover; mostly forward+backward, where the blockwise loop's per-block overhead shows)."""

REFERENCE_MAX_LOGITS = 64 * 64
"""For what jax.nn cannot compute, up to this ``q_seq * kv_seq`` the materialized reference beat the
blockwise kernel in most cases (``reference_max_seq`` squared, from the bias and soft-cap cases)."""

REFERENCE_MAX_KV = 1024
"""A decode step (a few queries) over more keys than this goes blockwise, which skips the key blocks past
``key_value_seq_lengths`` (``reference_max_kv``: the longest cache where the reference was faster)."""

GPU_REFERENCE_MAX_LOGITS = 4 * 8 * 4096 * 4096
"""On GPU, the reference for up to this many logits in all (``batch * heads * q_seq * kv_seq``: 2 GiB in
float32), from bench/results/auto-rule-gpu.json (an H200, float32, batch 4, 8 heads): the reference beat the
blockwise kernel in every bias and soft-cap case at 256, 1024 and 4096, the longest it ran at (0.94-1.35x
jax.nn's XLA time; blockwise 0.98-1.27x at 256, 1.9-3.2x above). The count includes batch and heads because
the reference holds the logits: a larger call goes blockwise, whose memory does not grow with them. The
blockwise kernel was 1.2-4.6x slower than XLA in every case jax.nn computes exactly at 1024 and 4096 (at
256, 0.91-5.2x: calls of about 0.1 ms), so the GPU rule has no ``XLA_MAX_SEQ``: it delegates wherever
jax.nn is exact."""

GPU_REFERENCE_MAX_KV = 4096
"""On GPU the reference takes up to this many keys: the same run's longest sequence (no decode step was
measured there, so no longer cache is known to favour it)."""

GPU_BLOCK_SPARSE = frozenset({"mask_mod", "block_mask"})
"""Features whose calls the blockwise kernel may run on a fraction of the blocks: on GPU they keep the
reference to ``GPU_BLOCK_SPARSE_MAX_LOGITS``, since the run that set the thresholds above had dense logits
only (bias, soft cap)."""

GPU_BLOCK_SPARSE_MAX_LOGITS = 256 * 256
"""``q_seq * kv_seq`` up to which a block-sparse call (``GPU_BLOCK_SPARSE``) takes the reference on GPU: the
shortest length the GPU run measured, where the reference won every case."""

DECODE_XLA_MAX_KV_BYTES = 4 * 2**20
"""A one-query step (a decode step) over a key cache larger than this (``batch * kv_seq * kv_heads * dim``
bytes) goes blockwise even where auto would delegate: the dense path reads the whole cache, and past the
CPU's caches XLA also copies it transposed every step (``decode_xla_max_kv_bytes``: the largest cache at
which jax.nn was still faster for a one-query step)."""

XLA_EXACT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
"""Dtypes in which auto delegates to jax.nn (float64: jax.nn's softmax runs in float32, see the table's
``float64`` row; float16: jax.nn's CPU path is not checked against jattn's in the conformance suite)."""

CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
CUDNN_MAX_HEAD_DIM = 128  # jax.nn's cuDNN flash attention: head dim <= 128 (256 from Hopper), a multiple of 8


class CallSignature(NamedTuple):
    """What the auto rule looks at: everything static about a call.

    ``q_seq`` and ``kv_seq`` are None when symbolic (``jax.export`` with a symbolic sequence length);
    ``features`` are the capability-table features the call uses (``_capabilities.features_of``).
    """

    backend: str
    dtype: jnp.dtype
    q_seq: int | None
    kv_seq: int | None
    dim: int
    v_dim: int
    features: frozenset[str] = frozenset()
    kv_bytes: int | None = None  # the key array's size (None when a dimension is symbolic)
    kv_heads: int | None = None
    kv_cache: bool = False  # key/value are jattn.nnx's KV cache, written by a scatter this step (_one_query)
    logits: int | None = None  # batch * heads * q_seq * kv_seq (None when a dimension is symbolic)


def signature_of(inputs: AttentionInputs, backend: str | None = None, *, kv_cache: bool = False) -> CallSignature:
    """The :class:`CallSignature` of a checked call on ``backend`` (default: JAX's default backend); ``kv_cache``:
    key and value are jattn.nnx's KV cache (``Execution.kv_cache``)."""
    query, key, value = inputs.query, inputs.key, inputs.value
    q_seq, kv_seq = query.shape[1], key.shape[1]
    concrete = _checks.is_concrete(q_seq) and _checks.is_concrete(kv_seq)
    sized = all(_checks.is_concrete(n) for n in key.shape)
    logits = (*query.shape[:3], kv_seq)
    return CallSignature(
        backend=backend or jax.default_backend(),
        dtype=jnp.dtype(query.dtype),
        q_seq=q_seq if concrete else None,
        kv_seq=kv_seq if concrete else None,
        dim=query.shape[-1],
        v_dim=value.shape[-1],
        features=frozenset(_capabilities.features_of(inputs)),
        kv_bytes=math.prod(key.shape) * jnp.dtype(key.dtype).itemsize if sized else None,
        kv_heads=key.shape[2],
        kv_cache=kv_cache,
        logits=math.prod(logits) if all(_checks.is_concrete(n) for n in logits) else None,
    )


def choose(s: CallSignature) -> Implementation:
    """The implementation ``implementation=None`` picks (documented rule).

    Only implementations that honour every feature of the call exactly (the
    capability table) are considered; among them:

    * On GPU, ``"cudnn"`` (jax.nn's fused cuDNN kernel) in float16/bfloat16
      with a head dim of at most 128 and a multiple of 8.
    * On backends other than CPU, ``"xla"``: on GPU the blockwise loop was slower
      than XLA at 1024 and 4096 (``GPU_REFERENCE_MAX_LOGITS`` cites the run).
    * On CPU, ``"blockwise"`` for a one-query step over more than
      ``DECODE_XLA_MAX_KV_BYTES`` of keys (a decode step over a large cache:
      it skips the blocks past ``key_value_seq_lengths``); for a smaller
      ``jattn.nnx`` decode step (``kv_cache``) of what ``_one_query``
      computes, ``"reference"`` in its one-query form, which reads the cache
      as it lies where jax.nn's program copies it transposed every step;
      else ``"xla"`` for sequences up to ``XLA_MAX_SEQ`` in float32 or bfloat16.
    * Otherwise ``"reference"`` for small problems (``REFERENCE_MAX_LOGITS``)
      over at most ``REFERENCE_MAX_KV`` keys or where the blockwise kernel
      cannot run (a symbolic sequence length), else ``"blockwise"``: it skips
      blocks no query sees. On GPU the reference's limits are
      ``GPU_REFERENCE_MAX_LOGITS`` logits in all over ``GPU_REFERENCE_MAX_KV``
      keys (``GPU_BLOCK_SPARSE_MAX_LOGITS`` for a ``mask_mod`` or ``block_mask``).

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn._dispatch import CallSignature, choose
        >>> cpu = CallSignature("cpu", jnp.dtype(jnp.float32), 4096, 4096, 64, 64)
        >>> choose(cpu), choose(cpu._replace(q_seq=8, kv_seq=8)), choose(cpu._replace(backend="gpu"))
        ('blockwise', 'xla', 'xla')
        >>> sinks = cpu._replace(backend="gpu", features=frozenset({"sinks"}), logits=4 * 8 * 4096 * 4096)
        >>> choose(sinks), choose(sinks._replace(logits=64 * 8 * 4096 * 4096))  # batch 4, then batch 64
        ('reference', 'blockwise')
        >>> choose(sinks._replace(features=frozenset({"sinks", "mask_mod"})))  # may skip blocks: blockwise
        'blockwise'
        >>> step = cpu._replace(q_seq=1, kv_seq=1024)  # a decode step: 2 MiB of keys, then 16 MiB
        >>> choose(step._replace(kv_bytes=2**21)), choose(step._replace(kv_bytes=2**24))
        ('xla', 'blockwise')
        >>> choose(step._replace(kv_bytes=2**21, kv_heads=8, kv_cache=True))  # jattn.nnx's decode step
        'reference'
    """
    features = dict.fromkeys(s.features, "")

    def exact(implementation: str) -> bool:
        return not _capabilities.lacking(implementation, features, exactly=True)

    if s.backend == "gpu" and exact("cudnn") and _cudnn_supports(s):
        return "cudnn"
    big_cache = s.kv_bytes is not None and s.kv_bytes > DECODE_XLA_MAX_KV_BYTES
    if s.backend == "cpu" and s.q_seq == 1 and big_cache and exact("blockwise"):
        return "blockwise"
    if s.backend == "cpu" and s.kv_cache and _one_query.applies(s.q_seq, s.kv_heads, s.dtype, s.features):
        return "reference"  # in its one-query form (_one_query), which never copies the cache
    sizes = None if s.q_seq is None or s.kv_seq is None else (s.q_seq, s.kv_seq)  # None: symbolic
    small = sizes is not None and max(sizes) <= XLA_MAX_SEQ
    if exact("xla") and sizes is not None and s.dtype in XLA_EXACT_DTYPES and (s.backend != "cpu" or small):
        return "xla"
    if not exact("blockwise") or sizes is None:  # blockwise lacks symbolic lengths: the table says so too
        return "reference"
    q_seq, kv_seq = sizes
    if s.backend == "gpu":
        if s.features & GPU_BLOCK_SPARSE:
            fits = q_seq * kv_seq <= GPU_BLOCK_SPARSE_MAX_LOGITS and kv_seq <= REFERENCE_MAX_KV
        else:
            fits = s.logits is not None and s.logits <= GPU_REFERENCE_MAX_LOGITS and kv_seq <= GPU_REFERENCE_MAX_KV
    else:
        fits = q_seq * kv_seq <= REFERENCE_MAX_LOGITS and kv_seq <= REFERENCE_MAX_KV
    return "reference" if fits else "blockwise"


def _cudnn_supports(s: CallSignature) -> bool:
    """jax.nn's cuDNN kernel's dtype and head-size limits (its option limits are in the capability table)."""
    return s.dtype in CUDNN_DTYPES and s.dim == s.v_dim and s.dim <= CUDNN_MAX_HEAD_DIM and s.dim % 8 == 0


class Route(NamedTuple):
    """Where a checked call runs: an implementation, the sequence-parallel plan when it has one, and whether
    the result is repaired to jattn's semantics (auto on jax.nn with rows that may see no key)."""

    implementation: Implementation
    sequence_plan: SequencePlan | None = None
    repair: bool = False
    one_query: bool = False  # auto's "reference" for a decode step: its one-query form (_one_query)


def route(prepared: Prepared, execution: Execution, backend: str | None = None) -> Route:
    """The one decision of which implementation runs a call (raises for what cannot be honoured)."""
    implementation = check_implementation(execution.implementation)
    sp = execution.sequence_parallel
    if sp is not None and implementation is not None:
        _capabilities.check_supported(implementation, {_capabilities.SEQUENCE_PARALLEL: "sequence_parallel"})
    if implementation in (None, "blockwise"):
        plan = plan_sequence_parallel(prepared.inputs, sp)
        if plan is not None:
            return Route("blockwise", plan)
    if implementation is None:
        # The one-query form's reshapes of the cache are not written for an explicit mesh's shardings.
        kv_cache = execution.kv_cache and explicit_mesh(*jax.tree.leaves(prepared.inputs)) is None
        s = signature_of(prepared.inputs, backend, kv_cache=kv_cache)
        chosen = choose(s)
        one_query = chosen == "reference" and _one_query.applies(s.q_seq, s.kv_heads, s.dtype, s.features)
        repair = _capabilities.repaired(chosen, dict.fromkeys(s.features, ""))
        return Route(chosen, repair=repair, one_query=one_query and s.kv_cache)
    _capabilities.check_supported(implementation, _capabilities.features_of(prepared.inputs))
    return Route(implementation)


def is_empty(inputs: AttentionInputs) -> bool:
    """No example, no query, no key, no head or no value feature: nothing to compute."""
    batch, q_seq, heads, _ = inputs.query.shape
    kv_seq, v_dim = inputs.key.shape[1], inputs.value.shape[-1]
    return any(_checks.is_concrete(n) and n == 0 for n in (batch, q_seq, kv_seq, heads, v_dim))


def empty_result(inputs: AttentionInputs) -> tuple[Array, Array]:
    """jattn's answer when :func:`is_empty`: zeros (no query sees a key), the masking sentinel as log-sum-exp."""
    batch, q_seq, heads, _ = inputs.query.shape
    out = jnp.zeros((batch, q_seq, heads, inputs.value.shape[-1]), inputs.value.dtype)
    acc = _numerics.compute_dtype(inputs.query.dtype)
    return out, jnp.full((batch, q_seq, heads), _numerics.masked_value(acc))


def run_route(prepared: Prepared, where: Route, execution: Execution) -> tuple[Array, Array]:
    """Runs a checked call where :func:`route` sent it: 4-D ``(out, lse)``."""
    block_q = execution.block_q or default_block_size()
    block_kv = execution.block_kv or default_block_size()
    inputs = clipped_lengths(prepared.inputs)  # jattn's own kernels; the jax.nn delegate gets them as given
    match where:
        case Route("reference", None, _, True):
            out, lse = _one_query.one_query_attention(whole_sequences(inputs))
            out, lse = like_query(out, inputs.query), like_query(lse, inputs.query)
        case Route("reference"):
            out, lse, _ = reference_attention(whole_sequences(inputs))
            out, lse = like_query(out, inputs.query), like_query(lse, inputs.query)
        case Route("blockwise", None):
            kernel = functools.partial(blockwise_attention, block_q=block_q, block_kv=block_kv)
            out, lse = run_per_shard(kernel, inputs)
        case Route("blockwise", SequencePlan() as plan):
            out, lse = run_sequence_parallel(plan, inputs, block_q=block_q, block_kv=block_kv)
        case Route("xla" | "cudnn" as delegate, None, repair):
            inputs = whole_sequences(prepared.inputs)
            inputs = with_segment_mask(inputs) if repair else inputs
            out, lse = jax_nn_attention(inputs, delegate, return_residual=execution.return_residual)
            if repair:
                out, lse = repair_rows(inputs, out, lse)
            out, lse = like_query(out, prepared.inputs.query), like_query(lse, prepared.inputs.query)
        case _:
            raise AssertionError(f"no implementation {where}")  # route() only returns known names
    return out, jax.lax.stop_gradient(lse)


def check_implementation(implementation):
    """Returns ``implementation`` if it is None or a known name, else raises ValueError listing the choices."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {(None, *IMPLEMENTATIONS)}; got {implementation!r}")
    return implementation
