"""Which implementation runs a call (the auto rule), and running it.

The rule is a pure function of :class:`Problem` — backend, dtype, shapes and
which options are used — so its tests pass the backend explicitly and run on
any machine. Its thresholds are measurements: each names the ``bench/`` run
and case that set it.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from . import _checks, _core, _sequence_parallel, masks
from ._blockwise import blockwise_attention
from ._options import AttentionInputs
from ._prepare import Prepared
from ._reference import reference_attention
from ._sharding import run_sharded

IMPLEMENTATIONS: tuple[str, ...] = ("reference", "blockwise", "xla", "cudnn")
"""The names ``dot_product_attention(..., implementation=)`` takes (besides None, the auto rule)."""
Implementation = Literal["reference", "blockwise", "xla", "cudnn"]

XLA_MAX_LOGITS = 128 * 128
"""On CPU, ``jax.nn``'s XLA attention beat the blockwise loop up to ``q_seq * kv_seq`` of this:
``bench/results/auto-rule-cpu.json``, attention cases ``fwd full T=128`` and ``fwd+bwd full T=128``
(batch 32); from ``T=256`` blockwise was faster."""

REFERENCE_MAX_LOGITS = 64 * 64
"""Below this ``q_seq * kv_seq`` the blockwise loop's bookkeeping costs as much as the maths and the
materialized reference was faster on CPU: ``bench/results/auto-rule-cpu.json``, ``fwd full T=64``."""

REFERENCE_MAX_KV = 1024
"""A few queries over more than this many keys (a decode step) go blockwise, which skips the key blocks
past ``key_value_seq_lengths``: ``bench/results/auto-rule-cpu.json``, ``decode`` cases (one query over a
4096-key cache filled to 64: blockwise faster; over 1024 keys the dense reference was faster)."""

CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
CUDNN_MAX_HEAD_DIM = 128  # jax.nn's cuDNN flash attention: head dim <= 128 (256 from Hopper), a multiple of 8


class Problem(NamedTuple):
    """What the auto rule looks at: everything static about a call.

    ``q_seq`` and ``kv_seq`` are None when symbolic (``jax.export`` with a symbolic sequence length).
    """

    backend: str
    dtype: jnp.dtype
    q_seq: int | None
    kv_seq: int | None
    dim: int
    v_dim: int
    exact_with_jax_nn: bool  # jax.nn supports every option and no query row can see no key
    cudnn_options: bool  # the options are ones jax.nn's cuDNN path takes (no right-hand window, bias on even lengths)


def problem(prepared: Prepared, backend: str | None = None) -> Problem:
    """The :class:`Problem` of a checked call on ``backend`` (default: JAX's default backend)."""
    query, key, value, bias, mask, opts = prepared.inputs
    q_seq, kv_seq, dim, v_dim = query.shape[1], key.shape[1], query.shape[-1], value.shape[-1]
    static, arrays = opts.static, opts.arrays
    concrete = _checks.is_concrete(q_seq) and _checks.is_concrete(kv_seq)
    lacking = mask is not None or v_dim != dim or static.logits_soft_cap is not None or not concrete
    lacking = lacking or _own_options(opts) != []
    # Causal rows always see key 0; a window leaves row i its own key while q_seq <= kv_seq. A bias row
    # of -inf sees no key either: jax.nn gives NaN there, so a bias rules jax.nn out.
    empty_rows = any(a is not None for a in arrays) or bias is not None
    empty_rows = empty_rows or (concrete and static.local_window_size is not None and q_seq > kv_seq)
    window = static.local_window_size
    cudnn_options = concrete and (window is None or window[1] == 0 or static.is_causal)
    return Problem(
        backend=backend or jax.default_backend(),
        dtype=jnp.dtype(query.dtype),
        q_seq=q_seq if concrete else None,
        kv_seq=kv_seq if concrete else None,
        dim=dim,
        v_dim=v_dim,
        exact_with_jax_nn=not lacking and not empty_rows,
        cudnn_options=cudnn_options,
    )


def choose(p: Problem) -> Implementation:
    """The implementation ``implementation=None`` picks (documented rule).

    * On GPU, ``"cudnn"`` (jax.nn's fused cuDNN kernel) wherever it computes
      exactly what jattn does: float16/bfloat16, head dim at most 128 and a
      multiple of 8, options it takes, and no query row that could see no key.
    * On backends other than CPU, ``"xla"`` wherever jax.nn is exact: no
      ``bench/`` run there yet shows the blockwise loop beating XLA.
    * On CPU, ``"xla"`` for small exact problems (``XLA_MAX_LOGITS``) in
      float32 or bfloat16 (jax.nn runs float64 softmax in float32).
    * Otherwise ``"reference"`` for tiny problems (``REFERENCE_MAX_LOGITS``)
      over at most ``REFERENCE_MAX_KV`` keys, else ``"blockwise"``: it honours
      every option and skips blocks no query sees.

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn._dispatch import Problem, choose
        >>> cpu = Problem("cpu", jnp.dtype(jnp.float32), 4096, 4096, 64, 64, True, True)
        >>> choose(cpu), choose(cpu._replace(q_seq=8, kv_seq=8)), choose(cpu._replace(backend="gpu"))
        ('blockwise', 'xla', 'xla')
    """
    if p.q_seq is None:  # a symbolic sequence length: the blockwise kernel needs concrete block counts
        return "reference"
    if p.backend == "gpu" and p.exact_with_jax_nn and _cudnn_supports(p):
        return "cudnn"
    exact_dtype = p.dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    if p.exact_with_jax_nn and exact_dtype and (p.backend != "cpu" or p.q_seq * p.kv_seq <= XLA_MAX_LOGITS):
        return "xla"
    if p.q_seq * p.kv_seq <= REFERENCE_MAX_LOGITS and p.kv_seq <= REFERENCE_MAX_KV:
        return "reference"
    return "blockwise"


def _cudnn_supports(p: Problem) -> bool:
    return (
        p.dtype in CUDNN_DTYPES
        and p.dim == p.v_dim
        and p.dim <= CUDNN_MAX_HEAD_DIM
        and p.dim % 8 == 0
        and p.cudnn_options
    )


def is_empty(inputs: AttentionInputs) -> bool:
    """No example, no query, no key, no head or no value feature: nothing to compute."""
    batch, q_seq, heads, _ = inputs.query.shape
    kv_seq, v_dim = inputs.key.shape[1], inputs.value.shape[-1]
    return any(_checks.is_concrete(n) and n == 0 for n in (batch, q_seq, kv_seq, heads, v_dim))


def empty_result(inputs: AttentionInputs) -> tuple[Array, Array]:
    """jattn's answer when :func:`is_empty`: zeros (no query sees a key), the masking sentinel as log-sum-exp."""
    batch, q_seq, heads, _ = inputs.query.shape
    out = jnp.zeros((batch, q_seq, heads, inputs.value.shape[-1]), inputs.value.dtype)
    acc = _core.compute_dtype(inputs.query.dtype)
    return out, jnp.full((batch, q_seq, heads), _core.masked_value(acc))


def run(
    prepared: Prepared,
    implementation: str,
    *,
    return_residual: bool,
    block_q: int,
    block_kv: int,
    sequence_plan: _sequence_parallel.Plan | None = None,
) -> tuple[Array, Array]:
    """Runs a checked call on one implementation: 4-D ``(out, lse)``."""
    match implementation:
        case "reference":
            out, lse, _ = reference_attention(prepared.inputs)
        case "blockwise" if sequence_plan is not None:
            out, lse = _sequence_parallel.run(sequence_plan, prepared.inputs, block_q=block_q, block_kv=block_kv)
        case "blockwise":
            kernel = functools.partial(blockwise_attention, block_q=block_q, block_kv=block_kv)
            out, lse = run_sharded(kernel, prepared.inputs)
        case "xla" | "cudnn":
            out, lse = _jax_nn(prepared.inputs, implementation, return_residual)
        case _:
            check_implementation(implementation)
    return out, jax.lax.stop_gradient(lse)


def check_implementation(implementation):
    """Returns ``implementation`` if it is None or a known name, else raises ValueError listing the choices."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {(None, *IMPLEMENTATIONS)}; got {implementation!r}")
    return implementation


def _shifted_mask(is_causal, window, offsets, q_seq: int, kv_seq: int) -> Array:
    """Causal and window masks at each example's query offset, dense ``(batch, 1, q_seq, kv_seq)``."""

    def one(offset):
        mods = [masks.Causal(offset)] if is_causal else []
        if window is not None:
            mods.append(masks.SlidingWindow(*window, offset))
        return masks.materialize(masks.and_masks(*mods), q_seq, kv_seq)

    return jax.vmap(one)(offsets)[:, None]


def _own_options(opts) -> list[str]:
    """The options jax.nn.dot_product_attention does not have."""
    static, arrays, shared = opts.static, opts.arrays, opts.shared
    named = {
        "query_segment_ids/key_value_segment_ids": arrays.q_segment_ids is not None,
        "logits_soft_cap": static.logits_soft_cap is not None,
        "score_mod": static.score_mod is not None,
        "mask_mod": static.mask_mod is not None,
        "sinks": shared.sinks is not None,
    }
    return [name for name, used in named.items() if used]


def _jax_nn(inputs: AttentionInputs, implementation: str, return_residual: bool) -> tuple[Array, Array]:
    """Delegates to ``jax.nn.dot_product_attention`` after refusing what it lacks."""
    query, key, value, bias, mask, opts = inputs
    unsupported = _own_options(opts)
    if value.shape[-1] != query.shape[-1]:
        unsupported.append(f"v_dim != dim ({value.shape[-1]} != {query.shape[-1]})")
    if unsupported:
        raise ValueError(
            f"implementation={implementation!r} (jax.nn.dot_product_attention) does not support "
            f"{', '.join(unsupported)}; use implementation='reference' or None"
        )
    is_causal, window = opts.static.is_causal, opts.static.local_window_size
    if opts.arrays.q_offset is not None and (is_causal or window is not None):
        # jax.nn has no query offset (a decode step): the shifted causal/window mask goes in as a dense one.
        dense = _shifted_mask(is_causal, window, opts.arrays.q_offset, query.shape[1], key.shape[1])
        mask = dense if mask is None else mask & dense
        is_causal, window = False, None
    # jax.nn mixes int32 lengths with default-int positions; keep that working under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        result = jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            scale=opts.static.scale,
            is_causal=is_causal,
            query_seq_lengths=opts.arrays.q_length,
            key_value_seq_lengths=opts.arrays.kv_length,
            local_window_size=window,
            implementation=implementation,
            return_residual=return_residual,
        )
    if not return_residual:  # the log-sum-exp costs an extra pass: ask only when wanted
        return result, jnp.zeros(result.shape[:-1], _core.compute_dtype(query.dtype))
    out, lse = result
    # jax.nn gives the log-sum-exp in the input dtype; jattn's is in the softmax dtype.
    return out, lse.astype(_core.compute_dtype(query.dtype))
