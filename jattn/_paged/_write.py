"""Writing new tokens' keys and values into the page pools: one scatter per pool, in place when donated.

``slot = physical_page * page_size + offset``. The pool is viewed as ``(num_pages * page_size, ...)`` (a
free reshape) and written with one scatter whose out-of-range indices are dropped: a negative slot
(padding) is sent out of range on purpose, so it writes nothing rather than wrapping to the last slot.
Jitted with the pools donated, XLA updates them in place (tested: no second pool is allocated).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .. import _checks
from ._validate import POOL_AXES, check_pool_dtype, check_quant_scale, is_concrete


def quantize(x: Array, dtype, scale: float | None) -> Array:
    """``x`` as stored in a pool of ``dtype``: divided by ``scale``, rounded (integers) and saturated."""
    if scale is None:
        return x
    y = x.astype(jnp.float32) / jnp.asarray(scale, jnp.float32)
    if jnp.issubdtype(dtype, jnp.integer):
        ints = jnp.iinfo(dtype)
        y, low, high = jnp.round(y), float(ints.min), float(ints.max)
    else:
        floats = jnp.finfo(dtype)  # float8 overflows to NaN or Inf without the clip
        low, high = float(floats.min), float(floats.max)
    return jnp.clip(y, low, high).astype(dtype)


def scatter(pool: Array, x: Array, slots: Array) -> Array:
    num_slots = pool.shape[0] * pool.shape[1]
    flat = pool.reshape(num_slots, *pool.shape[2:])
    index = jnp.where(slots < 0, num_slots, slots)  # padding: out of range, dropped
    return flat.at[index].set(x, mode="drop").reshape(pool.shape)


def check_write(pools: tuple[Array, Array], new: tuple[Array, Array], slot_mapping: Array, scales: tuple) -> None:
    """Static checks: ``keys (tokens, kv_heads, dim)`` and ``values (tokens, kv_heads, v_dim)`` fit the pools."""
    names = (("key_pages", "keys", "(tokens, kv_heads, dim)"), ("value_pages", "values", "(tokens, kv_heads, v_dim)"))
    for (name, what, axes), pool, x in zip(names, pools, new, strict=True):
        _checks.check_rank(name, pool, (4,), POOL_AXES[name])
        _checks.check_rank(what, x, (3,), axes)
        _checks.check_floating(what, x)
    _checks.check_shape("value_pages", pools[1], (*pools[0].shape[:3], pools[1].shape[3]), POOL_AXES["value_pages"])
    tokens = new[0].shape[0]
    for (name, what, axes), pool, x, scale in zip(names, pools, new, scales, strict=True):
        _checks.check_shape(what, x, (tokens, *pool.shape[2:]), axes)
        check_quant_scale(f"{name[0]}_scale", scale)
        check_pool_dtype(name, pool, (what, x.dtype), scale)
    _checks.check_integer("slot_mapping", slot_mapping)
    _checks.check_shape("slot_mapping", slot_mapping, (tokens,), "(tokens,)")


def check_slot_values(slots: np.ndarray, num_slots: int) -> None:
    """Concrete slots: inside the pool (or negative, padding) and each written once."""
    bad = np.argwhere(slots >= num_slots)
    if bad.size:
        i = int(bad[0, 0])
        raise ValueError(
            f"slot_mapping[{i}] must be < num_pages * page_size = {num_slots} (or < 0: padding); got {slots[i]}"
        )
    real = slots[slots >= 0]
    values, counts = np.unique(real, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"slot_mapping must write each slot at most once; slot {values[counts > 1][0]} appears twice or more"
        )


def write(key_pages, value_pages, keys, values, slot_mapping, *, k_scale=None, v_scale=None) -> tuple[Array, Array]:
    """The pools with ``keys`` / ``values`` written at ``slot_mapping`` (see ``jattn.paged.write``)."""
    pools = (jnp.asarray(key_pages), jnp.asarray(value_pages))
    new = (jnp.asarray(keys), jnp.asarray(values))
    slot_mapping = jnp.asarray(slot_mapping)
    check_write(pools, new, slot_mapping, (k_scale, v_scale))
    if is_concrete(slot_mapping):
        check_slot_values(np.asarray(slot_mapping), pools[0].shape[0] * pools[0].shape[1])
    slots = slot_mapping.astype(jnp.int32)
    out = []
    for pool, x, scale in zip(pools, new, (k_scale, v_scale), strict=True):
        out.append(scatter(pool, quantize(x, pool.dtype, None if scale is None else float(scale)), slots))
    return out[0], out[1]
