"""Static argument checks shared by every layer.

All checks run in Python at trace time on shapes and dtypes only; none of them
looks at values, so they cost nothing inside a compiled function. Every message
names the argument, what was expected and what was received.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(dim) -> bool:
    """True for an ordinary integer size, False for a symbolic one (``jax.export.symbolic_shape``)."""
    return not jax.export.is_symbolic_dim(dim)


def check_floating(name: str, x) -> None:
    """Raises TypeError unless ``x`` has a floating-point dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype; got {dtype}")


def check_same_dtype(**arrays) -> None:
    """Raises TypeError unless all named arrays share one dtype."""
    dtypes = {name: jnp.result_type(x) for name, x in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name}={dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"{', '.join(dtypes)} must share one dtype; got {listed}")


def check_bool(name: str, x) -> None:
    """Raises TypeError unless ``x`` is boolean (True = attend)."""
    dtype = jnp.result_type(x)
    if dtype != jnp.bool_:
        raise TypeError(f"{name} must be boolean (True = attend); got dtype {dtype}")


def check_integer(name: str, x) -> None:
    """Raises TypeError unless ``x`` has an integer dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype; got {dtype}")


def check_rank(name: str, x, ranks: Sequence[int], axes: str) -> None:
    """Raises ValueError unless ``x.ndim`` is one of ``ranks``.

    ``axes`` is the axis legend shown in the message, e.g. ``"(q_seq, dim)"``.
    """
    ndim = np.ndim(x)
    if ndim not in ranks:
        expected = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have rank {expected} {axes}; got rank {ndim} with shape {np.shape(x)}")


def check_shape(name: str, x, expected: tuple[int, ...], axes: str) -> None:
    """Raises ValueError unless ``x.shape == expected`` exactly."""
    if tuple(np.shape(x)) != tuple(expected):
        raise ValueError(f"{name} must have shape {axes}={tuple(expected)}; got {np.shape(x)}")


def check_broadcastable(name: str, x, target: tuple[int, ...], axes: str, *, shown=None) -> None:
    """Raises ValueError unless ``x`` broadcasts to ``target`` without adding axes.

    Each axis of ``x`` must be 1 or equal to the matching axis of ``target``;
    ``x`` must have exactly ``len(target)`` axes. ``shown`` is the shape the
    message reports (default ``x``'s), e.g. the caller's before axes were added.
    """
    shape = tuple(np.shape(x))
    ok = len(shape) == len(target) and all(s in (1, t) for s, t in zip(shape, target, strict=True))
    if not ok:
        raise ValueError(
            f"{name} must have shape {axes} broadcastable to {target}; got {shape if shown is None else shown}"
        )


def check_equal(name: str, actual: int, expected: int, what: str) -> None:
    """Raises ValueError unless two sizes agree, e.g. q and k feature dims."""
    if actual != expected:
        raise ValueError(f"{name}: {what} must be {expected}; got {actual}")


def check_static_bool(name: str, x) -> None:
    """Raises TypeError unless ``x`` is a Python (or NumPy) bool: a static option, not an array."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool; got {type(x).__name__}")


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    """Raises ValueError unless ``value`` is a positive Python int (bool excluded), or None if ``allow_none``.

    The one owner of this rule: block sizes, head counts, shard counts and cache lengths all call it.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {expected}; got {value!r}")
