"""The numerical machinery of ``jattn.testing``: comparisons, finite differences, worst elements."""

from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """The worst element of one comparison.

    Attributes:
        check: what was compared, e.g. ``"finite differences"``.
        argument: the argument whose gradient (or the output) was compared.
        index: the element's index in that array.
        actual: the value of the function under test.
        expected: the finite-difference or reference value.
        tolerance: ``atol + rtol * |expected|`` at that element.
    """

    check: str
    argument: str
    index: tuple[int, ...]
    actual: float
    expected: float
    tolerance: float

    @property
    def error(self) -> float:
        """``|actual - expected|``; infinite when either value is NaN or infinite."""
        err = abs(self.actual - self.expected)
        return err if math.isfinite(err) else math.inf

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{verdict:4} {self.check}: {self.argument}{list(self.index)} = {self.actual:.8g}, "
            f"expected {self.expected:.8g} (|error| {self.error:.2e}, tolerance {self.tolerance:.2e})"
        )


def hessian_vector_product(grad_fn, all_args):
    """``H t`` by reverse over reverse: the gradient of ``<grad L(x), t>``."""

    def hvp(primals, tangents):
        def directional(*xs):
            return sum(jnp.vdot(g, t) for g, t in zip(grad_fn(*xs), tangents, strict=True))

        return jax.grad(directional, argnums=all_args)(*primals)

    return hvp


def central_differences(loss, primals, samples, eps, chunk=128) -> list[np.ndarray]:
    """``dL/dx`` at the sampled flat indices of every argument.

    All arguments are raveled into one vector so a single vmapped function,
    compiled once, evaluates every perturbation (in fixed-size chunks).
    """
    flat, unravel = ravel_pytree(primals)
    offsets = np.cumsum([0, *(p.size for p in primals[:-1])])
    positions = np.concatenate([off + idx for off, idx in zip(offsets, samples, strict=True)]).astype(np.int64)
    n = len(positions)
    if n == 0:
        return [np.zeros(0) for _ in samples]
    chunk = min(chunk, n)
    positions = np.concatenate([positions, np.full(-n % chunk, positions[-1])])
    at = jax.jit(jax.vmap(lambda x: loss(*unravel(x))))
    values = []
    for start in range(0, len(positions), chunk):
        step = np.zeros((chunk, flat.size))
        step[np.arange(chunk), positions[start : start + chunk]] = eps
        both = at(jnp.concatenate([flat[None] + step, flat[None] - step]))
        plus, minus = np.split(np.asarray(both), 2)
        values.append((plus - minus) / (2 * eps))
    columns = np.concatenate(values)[:n]
    return np.split(columns, np.cumsum([len(idx) for idx in samples])[:-1])


def sample(size: int, max_elements: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_elements is None or size <= max_elements:
        return np.arange(size)
    return np.sort(rng.choice(size, max_elements, replace=False))


def compare(check, name, actual, expected, *, atol, rtol) -> Mismatch:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    flat_idx = np.arange(actual.size)
    flat = actual.reshape(-1), expected.reshape(-1)
    return worst_element(check, name, *flat, at=(flat_idx, actual.shape), atol=atol, rtol=rtol)


def worst_element(check, name, actual, expected, *, at, atol, rtol) -> Mismatch:
    """The element with the largest error relative to its tolerance; ``at = (flat_idx, shape)`` says where
    each compared element sits in the full array."""
    flat_idx, shape = at
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.size == 0:
        return Mismatch(check, name, (), 0.0, 0.0, atol)
    tolerance = atol + rtol * np.abs(expected)
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(actual - expected)
    error = np.where(np.isfinite(error), error, np.inf)
    excess = np.where(tolerance > 0, error / np.maximum(tolerance, np.finfo(np.float64).tiny), error)
    k = int(np.argmax(excess))
    index = tuple(int(i) for i in np.unravel_index(int(flat_idx[k]), shape))
    return Mismatch(check, name, index, float(actual[k]), float(expected[k]), float(tolerance[k]))


def is_floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def describe(x) -> str:
    return "None" if x is None else f"dtype {x.dtype}"


def argument_names(fn, n: int) -> list[str]:
    """Names of the first ``n`` positional parameters, ``args[i]`` where unknown."""
    names = [f"args[{i}]" for i in range(n)]
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return names
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, p in enumerate(positional[:n]):
        names[i] = p.name
    return names
