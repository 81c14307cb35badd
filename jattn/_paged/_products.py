"""Reading pages and the block products of paged attention, in two forms.

A chunk of keys comes out of the pool in the pool's layout ``(tokens, kv_heads, dim)``. A query block is
``(kv_heads, groups, block_q, dim)``: grouped-query heads share each kv head, so K/V are never repeated.

- **Batched** (many query rows): keys are transposed to ``(kv_heads, dim, tokens)`` once per chunk and the
  products are plain batched matmuls over kv heads; the transpose is paid back by the rows.
- **Block-diagonal** (a few rows, i.e. decode): the queries go into a block-diagonal matrix
  ``(kv_heads * dim, kv_heads * rows)`` whose block ``k`` holds kv head ``k``'s rows, so the logits of the
  whole chunk are one plain matmul of the untransposed keys ``(tokens, kv_heads * dim)``. It does
  ``kv_heads`` times the needed multiply-adds, but a decode step is bound by reading the pages, and on
  XLA:CPU a batched matmul whose batch axis is not the leading one (or a transpose of every chunk) costs
  more than the extra arithmetic (see ``_spec.BLOCK_DIAGONAL_MAX_ROWS``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .. import _numerics


def read_pages(pool: Array, ids: Array, scale: float | None, dtype) -> Array:
    """Pages ``ids`` (already inside the pool) as ``(len(ids) * page_size, kv_heads, x)`` in ``dtype``.

    Only those pages are gathered. A quantized page is read as ``page.astype(float32) * scale``.
    """
    pages = jnp.take(pool, ids, axis=0, mode="clip")
    x = pages.reshape(-1, *pool.shape[2:])
    if scale is not None:
        x = x.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
    return x.astype(dtype)


def query_operand(q: Array, block_diagonal: bool) -> Array:
    """``q (kv_heads, groups, block_q, dim)`` in the form :func:`logits` takes.

    Block-diagonal: ``(kv_heads * dim, kv_heads * groups * block_q)``, entry ``((k', d), (k, g, t))`` equal
    to ``q[k, g, t, d]`` where ``k' == k`` and 0 elsewhere. Batched: ``q`` itself.
    """
    if not block_diagonal:
        return q
    kv_heads, groups, block_q, dim = q.shape
    eye = jnp.eye(kv_heads, dtype=q.dtype)[:, None, :, None, None]  # (k', 1, k, 1, 1)
    return (eye * q.transpose(3, 0, 1, 2)[None]).reshape(kv_heads * dim, kv_heads * groups * block_q)


def logits(q_op: Array, keys: Array, shape: tuple[int, ...]) -> Array:
    """``q . k`` of every row and token: ``(kv_heads, groups, block_q, tokens)`` for ``shape`` the
    ``(kv_heads, groups, block_q)`` of the rows; ``keys (tokens, kv_heads, dim)``."""
    acc = _numerics.compute_dtype(keys.dtype)
    tokens = keys.shape[0]
    if q_op.ndim == 2:  # block-diagonal
        s = jnp.matmul(keys.reshape(tokens, -1), q_op, preferred_element_type=acc)
        # Without the barrier XLA folds the (small) transpose below into the matmul, which turns it into a
        # transposed-operand product over the whole chunk: 2x slower on XLA:CPU (serve suite, decode).
        return lax.optimization_barrier(s).T.reshape(*shape, tokens)
    kv_heads = shape[0]
    s = jnp.matmul(q_op.reshape(kv_heads, -1, q_op.shape[-1]), keys.transpose(1, 2, 0), preferred_element_type=acc)
    return s.reshape(*shape, tokens)


def weighted(p: Array, values: Array, block_diagonal: bool) -> Array:
    """``p . v``: ``p (kv_heads, groups, block_q, tokens)``, ``values (tokens, kv_heads, x)`` ->
    ``(kv_heads, groups, block_q, x)``."""
    acc = _numerics.compute_dtype(values.dtype)
    kv_heads, groups, block_q, tokens = p.shape
    rows = groups * block_q
    if block_diagonal:  # every row against every kv head, then the diagonal blocks
        full = jnp.matmul(p.reshape(-1, tokens), values.reshape(tokens, -1), preferred_element_type=acc)
        full = full.reshape(kv_heads, rows, kv_heads, -1)
        out = jnp.einsum("krkx->krx", full)
    else:
        out = jnp.matmul(p.reshape(kv_heads, rows, tokens), values.transpose(1, 0, 2), preferred_element_type=acc)
    return out.reshape(kv_heads, groups, block_q, -1)


def keys_grad(ds: Array, q: Array) -> Array:
    """``ds^T . q``: ``ds (kv_heads, groups, block_q, tokens)``, ``q (kv_heads, groups, block_q, x)`` ->
    ``(tokens, kv_heads, x)`` (the backward's d(keys) and d(values) of one chunk)."""
    acc = _numerics.compute_dtype(q.dtype)
    kv_heads, _, _, tokens = ds.shape
    out = jnp.matmul(
        ds.reshape(kv_heads, -1, tokens).transpose(0, 2, 1),
        q.reshape(kv_heads, -1, q.shape[-1]),
        preferred_element_type=acc,
    )
    return out.transpose(1, 0, 2)
