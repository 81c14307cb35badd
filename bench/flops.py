"""Honest FLOP counts for attention, matmul and the multi-head module.

Conventions (stated once, tested in ``tests/test_bench.py``):

- A multiply-add is 2 FLOPs; softmax, scaling and masking are not counted
  (they are O(q_seq * kv_seq), not O(q_seq * kv_seq * dim)).
- Forward attention is two matmuls over the *visible* (query, key) pairs:
  ``2 * batch * heads * pairs * (dim + v_dim)``, i.e. ``4 * B * H * Tq * Tk * D``
  without a mask.
- Causal counts exactly the visible pairs: query ``i`` sees keys ``j <= i``
  (top-left aligned, as ``is_causal`` in jattn and ``jax.nn``).
- Grouped-query attention does not change the count: every query head still
  does its own two matmuls, whatever the number of key/value heads.
- Cross-attention uses ``q_seq * kv_seq`` pairs.
- Backward is ``backward_factor`` (2.5, the FlashAttention convention: five
  matmuls against the forward's two) times the forward, so forward+backward is
  3.5 times the forward.
- A JVP (``jax.jvp``, tangents for q, k and v) is the forward plus a tangent
  pass counted like the backward (five matmuls: the recomputed ``Q K^T``,
  ``dQ K^T``, ``Q dK^T``, ``dP V`` and ``P dV``): also 3.5 times the forward.
- A Hessian-vector product forward over reverse (``jax.jvp`` of ``jax.grad``)
  is counted as twice forward+backward: 7 times the forward.
- A decode step of one token at cache fill ``f`` projects that token (four
  projections) and attends one query over the ``f + 1`` visible keys (the
  cached ones and its own), whatever the cache's ``max_length``.
"""

from __future__ import annotations

MODES = ("fwd", "fwd+bwd", "jvp", "hvp")


def visible_pairs(q_seq: int, kv_seq: int, *, causal: bool) -> int:
    """Number of (query, key) pairs that attention actually computes.

    Args:
        q_seq: number of queries.
        kv_seq: number of keys.
        causal: query ``i`` sees keys ``j <= i`` only.

    Returns:
        ``q_seq * kv_seq`` without a mask, else ``sum_i min(i + 1, kv_seq)``.
    """
    if not causal:
        return q_seq * kv_seq
    m = min(q_seq, kv_seq)
    return m * (m + 1) // 2 + (q_seq - m) * kv_seq


def attention_flops(
    *,
    batch: int,
    heads: int,
    q_seq: int,
    kv_seq: int,
    dim: int,
    v_dim: int | None = None,
    kv_heads: int | None = None,
    causal: bool = False,
    mode: str = "fwd",
    backward_factor: float = 2.5,
) -> int:
    """FLOPs of one attention call (see the module docstring for the convention).

    Args:
        batch: examples.
        heads: query heads.
        q_seq: query positions.
        kv_seq: key/value positions.
        dim: query/key features.
        v_dim: value features (``None`` = ``dim``).
        kv_heads: key/value heads; checked to divide ``heads``, otherwise unused
            (grouped-query attention costs the same per query head).
        causal: count only the pairs a causal mask leaves visible.
        mode: ``"fwd"``, ``"fwd+bwd"``, ``"jvp"`` or ``"hvp"``.
        backward_factor: backward cost as a multiple of the forward.

    Returns:
        The FLOP count, an int.

    Raises:
        ValueError: on an unknown mode or ``heads % kv_heads != 0``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if kv_heads is not None and heads % kv_heads:
        raise ValueError(f"heads must be a multiple of kv_heads; got heads={heads}, kv_heads={kv_heads}")
    v_dim = dim if v_dim is None else v_dim
    forward = 2 * batch * heads * visible_pairs(q_seq, kv_seq, causal=causal) * (dim + v_dim)
    factor = {"fwd": 1, "fwd+bwd": 1 + backward_factor, "jvp": 1 + backward_factor, "hvp": 2 * (1 + backward_factor)}
    return round(forward * factor[mode])


def matmul_flops(m: int, k: int, n: int, *, batch: int = 1) -> int:
    """FLOPs of ``batch`` products of an ``(m, k)`` and a ``(k, n)`` matrix."""
    return 2 * batch * m * k * n


def module_flops(*, batch: int, seq: int, features: int, heads: int, head_dim: int) -> int:
    """Forward FLOPs of multi-head self-attention with q/k/v/out projections.

    Three input projections ``features -> heads * head_dim``, unmasked attention,
    one output projection ``heads * head_dim -> features``; biases not counted.
    """
    inner = heads * head_dim
    projections = matmul_flops(batch * seq, features, inner) * 3 + matmul_flops(batch * seq, inner, features)
    attention = attention_flops(batch=batch, heads=heads, q_seq=seq, kv_seq=seq, dim=head_dim)
    return projections + attention


def decode_flops(*, batch: int, fill: int, features: int, heads: int, head_dim: int) -> int:
    """FLOPs of one decode step: one token per example, ``fill`` positions already cached.

    The four projections of :func:`module_flops` for one token, plus attention
    of one query over ``fill + 1`` keys; biases not counted.
    """
    inner = heads * head_dim
    projections = matmul_flops(batch, features, inner) * 3 + matmul_flops(batch, inner, features)
    return projections + attention_flops(batch=batch, heads=heads, q_seq=1, kv_seq=fill + 1, dim=head_dim)
