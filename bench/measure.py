"""Timing and memory of one target: compile once, warm up, time repeated calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from .case import JaxTarget, PythonTarget, Target


def _memory_field(compiled: Any, field: str) -> int | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends raise NotImplementedError or XlaRuntimeError
        return None
    value = getattr(stats, field, None) if stats is not None else None
    return None if value is None else int(value)


def temp_bytes(compiled: Any) -> int | None:
    """XLA's temp buffer size of a compiled function, or None where the backend does not say."""
    return _memory_field(compiled, "temp_size_in_bytes")


def argument_bytes(compiled: Any) -> int | None:
    """XLA's argument size of a compiled function (per device for a sharded one), or None where not said."""
    return _memory_field(compiled, "argument_size_in_bytes")


def time_calls(call: Callable[[], Any], *, repeats: int, warmup: int) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``call`` after ``warmup`` untimed ones.

    ``call`` must block until its result is ready.
    """
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def measure(target: Target, *, repeats: int, warmup: int) -> dict[str, Any]:
    """Measures a target.

    Args:
        target: a ``JaxTarget`` (lowered and compiled first, compile time,
            temp memory and its ``compiled_metrics`` recorded; called only if
            ``timed``) or a ``PythonTarget`` (called as is).
        repeats: timed calls (the issue asks for at least 5; tests use fewer).
        warmup: untimed calls before them.

    Returns:
        ``compile_s``, ``temp_bytes``, ``metrics``, ``times_s``, ``median_s``,
        ``min_s``, ``max_s``, ``repeats``; compile and memory are None for
        Python targets, the times None (and ``times_s`` empty) for an untimed one.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    metrics: dict[str, Any] = {}
    match target:
        case JaxTarget(fn=fn, args=args):
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            compile_s = time.perf_counter() - start
            memory = temp_bytes(compiled)
            if target.compiled_metrics is not None:
                metrics = dict(target.compiled_metrics(compiled))
            times = []
            if target.timed:
                times = time_calls(lambda: jax.block_until_ready(compiled(*args)), repeats=repeats, warmup=warmup)
        case PythonTarget(fn=fn, args=args):
            compile_s, memory = None, None
            times = time_calls(lambda: fn(*args), repeats=repeats, warmup=warmup)
        case _:
            raise TypeError(f"target must be a JaxTarget or PythonTarget; got {type(target).__name__}")
    return {
        "compile_s": compile_s,
        "temp_bytes": memory,
        "metrics": metrics,
        "times_s": times,
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "max_s": max(times) if times else None,
        "repeats": len(times),
    }
