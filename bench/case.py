"""What a suite hands the runner: a ``Case`` that builds a ``Target`` on demand.

Building is lazy so that inputs for one case live only while it runs, and so
that a case which cannot run (missing module, unsupported backend) fails inside
the runner, where it is recorded, rather than while the case list is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


class Unavailable(Exception):
    """Raised by ``Case.build`` when the case cannot exist here (recorded as ``unavailable``)."""


@dataclasses.dataclass(frozen=True)
class JaxTarget:
    """A JAX function to compile with ``jax.jit`` and call on ``args``.

    Attributes:
        fn, args: what is compiled and timed.
        notes: free-form remarks, listed under the results table.
        compiled_metrics: reads figures from the compiled program (memory,
            collectives) into the record's ``metrics``; None = none.
        timed: False compiles only (no call, no time): ``args`` may then be
            ``jax.ShapeDtypeStruct`` s, for shapes too slow to run here.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    notes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    compiled_metrics: Callable[[Any], Mapping[str, Any]] | None = None
    timed: bool = True


@dataclasses.dataclass(frozen=True)
class PythonTarget:
    """A plain Python callable (NumPy, torch) timed as is; no compile step.

    ``fn`` must return only once its work is done (torch on GPU synchronises
    inside it).
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    notes: Mapping[str, Any] = dataclasses.field(default_factory=dict)


Target = JaxTarget | PythonTarget


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: an implementation at one shape.

    Attributes:
        suite: registering suite, e.g. ``"attention"``.
        impl: implementation label, ``"<library>:<name>"``, e.g. ``"jattn:reference"``.
        label: short human description of the shape, e.g. ``"fwd causal T=512"``.
        params: JSON-able shape and options; cases with equal ``suite`` and
            ``params`` are compared with each other (ratios to peers).
        flops: FLOP count of one call (see ``bench.flops``), or None.
        build: makes the target; may raise ``Unavailable`` or any error.
        peer: True for the implementations jattn is compared against.
    """

    suite: str
    impl: str
    label: str
    params: Mapping[str, Any]
    flops: int | None
    build: Callable[[], Target]
    peer: bool = False
