"""Collectives in a compiled program: how many run and how many bytes each device receives.

Reads XLA's optimized HLO text (``jax.jit(f).lower(...).compile().as_text()``):
every collective op is counted once per execution, so an op inside a ``while``
loop whose trip count XLA knows (``known_trip_count``) counts that many times,
nested loops multiplying. Asynchronous pairs (``collective-permute-start`` /
``-done``) count once, at the start.

Bytes received per device, from the op's result and its group of ``g`` devices:
a collective-permute receives its result; an all-gather the ``g - 1`` pieces
of its result that other devices hold; a reduce-scatter ``g - 1`` partial
results the size of its result; an all-to-all ``(g - 1) / g`` of its result; an
all-reduce ``2 (g - 1) / g`` of it (a ring all-reduce: reduce-scatter, then
all-gather).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re

import numpy as np

KINDS = ("collective-permute", "all-gather", "all-reduce", "reduce-scatter", "all-to-all")

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_OP = re.compile(r"=\s*(\(.*?\)|[\w\[\]{},:\s]+?)\s+(" + "|".join(KINDS) + r")(?:-start)?\(")
_WHILE = re.compile(r"\bwhile\(.*body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:to_apply|branch_computations|calls)=\{?%?([\w.\-, %]+)\}?")
_SHAPE = re.compile(r"(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


_GROUPS = re.compile(r"replica_groups=(\{\{[\d,]*\}|\[(\d+),(\d+)\])")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # received per device per execution (see the module docstring)
    count: int  # executions per run of the program


def _group_size(line: str) -> int:
    """Devices per replica group (``{{0,1,2,3}}`` or the iota form ``[groups,size]<=[...]``); 1 if absent."""
    match = _GROUPS.search(line)
    if match is None:
        return 1
    if match.group(2) is not None:
        return int(match.group(3))
    return len([d for d in match.group(1).strip("{}").split(",") if d])


def _received(kind: str, result_bytes: int, group: int) -> int:
    if kind == "collective-permute":
        return result_bytes
    if kind == "all-gather" or kind == "all-to-all":
        return result_bytes * (group - 1) // max(group, 1)
    if kind == "reduce-scatter":
        return result_bytes * (group - 1)
    return 2 * result_bytes * (group - 1) // max(group, 1)  # all-reduce


def _bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape_text):
        size = _BYTES.get(dtype, int(dtype[1:]) // 8 if dtype[1:].isdigit() else 4)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of the entry computation, loops unrolled by their known trip counts.

    Raises:
        ValueError: a collective inside a loop whose trip count XLA does not know.
    """
    bodies: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            name = match.group(1)
            bodies[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif name is not None:
            bodies[name].append(line)

    def walk(computation: str, times: int, out: list[Collective], seen: tuple[str, ...]):
        for line in bodies.get(computation, ()):
            op = _OP.search(line)
            if op and "-done" not in line.split("=")[1].split("(")[0]:
                kind = op.group(2)
                out.append(Collective(kind, _received(kind, _bytes(op.group(1)), _group_size(line)), times))
            loop = _WHILE.search(line)
            if loop:
                trip = _TRIP.search(line)
                inner: list[Collective] = []
                walk(loop.group(1), 1, inner, (*seen, computation))
                if inner and trip is None:
                    raise ValueError(f"a collective in a while loop of unknown trip count: {line.strip()[:120]}")
                out.extend(dataclasses.replace(c, count=c.count * times * int(trip.group(1))) for c in inner)
                continue
            for called in _CALLS.findall(line):
                for callee in re.split(r"[,\s%]+", called):
                    if callee in bodies and callee not in seen and callee != computation:
                        walk(callee, times, out, (*seen, computation))

    found: list[Collective] = []
    walk(entry, 1, found, ())
    return found


def summary(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per kind: executions per run and bytes each device receives per run (see the module docstring)."""
    out: dict[str, dict[str, int]] = {}
    for c in collectives(hlo_text):
        entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += c.count
        entry["bytes"] += c.count * c.bytes
    return out


def sizes(hlo_text: str, kind: str) -> np.ndarray:
    """Byte size of each execution of ``kind``, sorted (e.g. to tell K/V transfers from dK/dV ones)."""
    return np.sort(np.array([c.bytes for c in collectives(hlo_text) if c.kind == kind for _ in range(c.count)]))


def instructions(hlo_text: str) -> str:
    """Optimized HLO without names, source locations or stack frames: the instructions only (two calls that
    compile to the same program give the same text)."""
    text = re.sub(r",?\s*(metadata=\{[^}]*\}|stack_frame_id=\d+)", "", hlo_text)
    text = re.sub(r"\b(region|main)_?[\d.]*\b", r"\1", text)
    return "\n".join(line.strip() for line in text.splitlines() if " = " in line)


def program_id(hlo_text: str) -> str:
    """A short digest of :func:`instructions`: equal for the same compiled program."""
    return hashlib.sha1(instructions(hlo_text).encode()).hexdigest()[:12]
