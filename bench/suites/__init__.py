"""Suite registry: a suite is a module with ``cases(config) -> Iterable[Case]``.

To add one, write ``bench/suites/<name>.py`` with a ``cases`` function and list
it in ``SUITES``; the runner, table, JSON and plot need no change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..case import Case
from ..config import BenchConfig
from . import attention, decode, flex, matmul, module, parallel, seed, serve

SUITES: dict[str, Callable[[BenchConfig], Iterable[Case]]] = {
    "matmul": matmul.cases,
    "attention": attention.cases,
    "seed": seed.cases,
    "module": module.cases,
    "decode": decode.cases,
    "flex": flex.cases,
    "parallel": parallel.cases,
    "serve": serve.cases,
}
