"""User ``score_mod`` / ``mask_mod`` functions: closure conversion and blockwise evaluation.

A user writes plain closures, ``score_mod(score, batch, head, q_idx, kv_idx)``
and ``mask_mod(batch, head, q_idx, kv_idx)``, that may capture arrays (ALiBi
slopes, a bias table, document ids). The kernels need those arrays as explicit
operands — they are differentiated, batched and sharded like any other input —
so each function is traced once on scalars (:func:`convert`), which hoists
every captured array into ``consts``, and evaluated later on a block with
nested ``vmap``s laid out like the block (:func:`evaluate`): the score axes are
batched where they vary and an index that does not vary along an axis is not
broadcast along it, so ``slopes[head]`` gathers once per head, not once per
logit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._jax_compat import Literal, eval_jaxpr

SCORE_MOD_ARGS = ("score", "batch", "head", "q_idx", "kv_idx")
MASK_MOD_ARGS = ("batch", "head", "q_idx", "kv_idx")


@dataclasses.dataclass(frozen=True, eq=False)
class ConvertedMod:
    """A mod traced on scalars; ``consts`` (the arrays it captured) are passed to every call.

    Hashed by identity: a static part of the options (a ``jit`` static or
    primitive parameter); the arrays travel separately as operands.
    """

    jaxpr: Any  # an open jaxpr whose constvars are the captured arrays
    kind: str  # "score" or "mask"
    name: str  # the user function's name, for messages

    def __call__(self, *args, consts):
        return eval_jaxpr(self.jaxpr, list(consts), *args)[0]

    def uses(self, argument: str) -> bool:
        """Whether the mod's value may depend on ``argument`` (a name of ``SCORE_MOD_ARGS`` or
        ``MASK_MOD_ARGS``). Conservative: an equation whose result is used uses all its inputs. A mask
        that ignores the head is evaluated on one head and broadcast (8 heads: 8x less work)."""
        names = SCORE_MOD_ARGS if self.kind == "score" else MASK_MOD_ARGS
        return self._used_inputs[names.index(argument)]

    @functools.cached_property
    def _used_inputs(self) -> tuple[bool, ...]:
        used = {v for v in self.jaxpr.outvars if not isinstance(v, Literal)}
        for eqn in reversed(self.jaxpr.eqns):
            if eqn.effects or any(v in used for v in eqn.outvars):
                used.update(v for v in eqn.invars if not isinstance(v, Literal))
        return tuple(v in used for v in self.jaxpr.invars)


def convert(fn: Callable, kind: str, score_dtype=jnp.float32) -> tuple[ConvertedMod, tuple[Array, ...]]:
    """Traces ``fn`` on scalars and hoists every array it captured; checks what it returns.

    It is traced outside any mesh: the jaxpr is evaluated later on values of one shard inside a
    ``shard_map`` (sequence parallel) as well as on whole arrays under an explicit mesh, and a jaxpr traced
    under the caller's explicit mesh would carry that mesh into the manual one.
    """
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return _convert(fn, kind, score_dtype)


def _convert(fn: Callable, kind: str, score_dtype) -> tuple[ConvertedMod, tuple[Array, ...]]:
    name = getattr(fn, "__name__", type(fn).__name__)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    if kind == "score":
        args = (jax.ShapeDtypeStruct((), score_dtype), index, index, index, index)
        closed = jax.make_jaxpr(fn)(*args)
        out = closed.out_avals
        if len(out) != 1 or out[0].shape != () or out[0].dtype != jnp.dtype(score_dtype):
            raise TypeError(
                f"score_mod must return one score of the score's dtype {jnp.dtype(score_dtype)} and shape (), "
                f"elementwise; {name} returned {[f'{a.dtype}{list(a.shape)}' for a in out]}"
            )
    else:
        fn = as_mask_mod(fn)
        closed = jax.make_jaxpr(fn)(index, index, index, index)
        out = closed.out_avals
        if len(out) != 1 or out[0].shape != () or out[0].dtype != jnp.bool_:
            raise TypeError(
                f"mask_mod must return one boolean (True = attend) of shape (), elementwise; {name} returned "
                f"{[f'{a.dtype}{list(a.shape)}' for a in out]}"
            )
    return ConvertedMod(closed.jaxpr, kind, name), tuple(jnp.asarray(c) for c in closed.consts)


def as_mask_mod(fn: Callable) -> Callable:
    """``fn(batch, head, q_idx, kv_idx)``; a two-argument ``fn(q_idx, kv_idx)`` (the ``jattn.masks``
    predicates, or a user's) is wrapped to ignore batch and head."""
    if _positional_count(fn) == 2:
        return lambda batch, head, q_idx, kv_idx: fn(q_idx, kv_idx)
    return fn


def _positional_count(fn) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a block of logits is laid out: ``axes`` names its axes in order.

    ``"k"`` kv head, ``"g"`` group (query head ``kv_head * groups + group``),
    ``"q"`` query position, ``"s"`` key position. An axis the block lacks (the
    reference works on one head at a time) takes the scalar passed for it.
    """

    axes: str
    groups: int


def evaluate(mod: ConvertedMod, consts, shape, layout: Layout, *, example, q_start, kv_start, head=(0, 0), score=None):
    """``mod`` on every position of a block of ``shape`` laid out as ``layout``.

    ``score`` (the block of logits) is given for a score mod; ``head`` is the
    ``(kv_head, group)`` of a block without those axes. The result has ``shape``.
    """
    groups = layout.groups

    def scalar(score, kv_head, group, q, kv):
        head = kv_head * groups + group
        if mod.kind == "score":
            return mod(score, example, head, q, kv, consts=consts)
        return mod(example, head, q, kv, consts=consts)

    def values(axis, fixed):
        if axis not in layout.axes:
            return jnp.asarray(fixed, jnp.int32)
        return fixed + jnp.arange(shape[layout.axes.index(axis)], dtype=jnp.int32)

    args = [score, values("k", head[0]), values("g", head[1]), values("q", q_start), values("s", kv_start)]
    if "k" in layout.axes:
        args[1] = args[1] - head[0]  # the block's own kv heads start at 0
    if "g" in layout.axes:
        args[2] = args[2] - head[1]
    slot = {"k": 1, "g": 2, "q": 3, "s": 4}  # the argument of `scalar` each axis feeds
    fn = scalar
    for axis in reversed(layout.axes):  # innermost vmap = last axis
        in_axes: list[int | None] = [None] * 5
        in_axes[slot[axis]] = 0
        in_axes[0] = None if score is None else 0
        fn = jax.vmap(fn, in_axes=tuple(in_axes))
    return fn(*args)
