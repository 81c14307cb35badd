"""Attention over sharded inputs: sequence parallelism (ring / all-gather K/V) and per-shard placement.

* ``_config``: :class:`SequenceParallel`, how a call asks for it (``jattn.sharding`` re-exports it);
* ``_plan``: whether and how a blockwise call runs sequence-parallel (``plan_sequence_parallel``) and
  running it in a ``shard_map`` (``run_sequence_parallel``);
* ``_placement``: any other kernel call on inputs sharded over explicit mesh axes, per batch/head shard;
* ``_zigzag``: the zigzag layout and each device's share of the work.

Nothing here imports a public jattn module; the public ``jattn.sharding`` calls this package.
"""

from ._config import LAYOUTS, STRATEGIES, SequenceParallel
from ._placement import run_per_shard
from ._plan import SequencePlan, plan_sequence_parallel, run_sequence_parallel

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "SequenceParallel",
    "SequencePlan",
    "plan_sequence_parallel",
    "run_per_shard",
    "run_sequence_parallel",
]
