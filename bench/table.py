"""Tables from a results document: plain text for the terminal, Markdown for the README."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

Table = tuple[list[str], list[list[str]]]


def fmt_time(seconds: float | None) -> str:
    """``"12.3 us"``, ``"4.56 ms"``, ``"1.23 s"``; ``"-"`` for None."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            return f"{seconds / scale:.3g} {unit}"
    raise AssertionError("unreachable")


def fmt_bytes(n: int | None) -> str:
    """Bytes in MiB (KiB below 1 MiB); ``"-"`` for None (the backend does not report it)."""
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def fmt_number(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def fmt_ratios(ratios: dict[str, float]) -> str:
    """``"1.05x jax.nn:xla"`` per peer: time over the peer's, below 1 is faster."""
    return ", ".join(f"{r:.2f}x {peer}" for peer, r in ratios.items()) or "-"


RESULT_HEADERS = "suite impl case median min max compile GFLOP/s %roof temp-mem vs-peer".split()


def result_rows(results: Sequence[dict[str, Any]]) -> Table:
    """One row per successful case."""
    rows = [
        [
            r["suite"],
            r["impl"] + (" (peer)" if r["peer"] else ""),
            r["label"],
            fmt_time(r["median_s"]),
            fmt_time(r["min_s"]),
            fmt_time(r["max_s"]),
            fmt_time(r["compile_s"]),
            fmt_number(r["gflops"]),
            fmt_number(r["roofline_pct"], ".1f"),
            fmt_bytes(r["temp_bytes"]),
            fmt_ratios(r["ratios"]),
        ]
        for r in results
        if r["status"] == "ok"
    ]
    return RESULT_HEADERS, rows


def failure_rows(results: Sequence[dict[str, Any]]) -> Table:
    """Cases that did not run, one row per distinct (suite, impl, status, error) with a count."""
    counts: dict[tuple[str, str, str, str], int] = {}
    for r in results:
        if r["status"] != "ok":
            key = (r["suite"], r["impl"], r["status"], r["error"] or "")
            counts[key] = counts.get(key, 0) + 1
    rows = [[suite, impl, status, str(n), error] for (suite, impl, status, error), n in counts.items()]
    return ["suite", "impl", "status", "cases", "reason"], rows


def notes(results: Sequence[dict[str, Any]]) -> list[str]:
    """``"suite impl label: key=value, ..."`` for every case that left notes (e.g. weight copying)."""
    return [
        f"{r['suite']} {r['impl']} {r['label']}: " + ", ".join(f"{k}={v}" for k, v in r["notes"].items())
        for r in results
        if r.get("notes")
    ]


def attention_pivot(results: Sequence[dict[str, Any]]) -> Table:
    """Attention medians as one row per (mode, causal, lengths), one column per implementation.

    Each jattn cell also shows its ratio to the first peer (``xla`` in jax.nn).
    """
    attention = [r for r in results if r["suite"] == "attention" and r["status"] == "ok"]
    impls = list(dict.fromkeys(r["impl"] for r in attention))
    rows: dict[str, dict[str, str]] = {}
    for r in attention:
        cell = fmt_time(r["median_s"])
        if r["ratios"]:
            cell += f" ({next(iter(r['ratios'].values())):.2f}x)"
        rows.setdefault(r["label"], {})[r["impl"]] = cell
    headers = ["case", *(f"{i} (peer)" if _is_peer(attention, i) else i for i in impls)]
    return headers, [[label, *(cells.get(i, "-") for i in impls)] for label, cells in rows.items()]


PARALLEL_HEADERS = [
    "impl", "case", "mem/device", "mem vs 1", "visited max", "mean", "max/mean", "moved/device", "collectives",
    "median", "time vs 1",
]  # fmt: skip


def parallel_rows(results: Sequence[dict[str, Any]]) -> Table:
    """The ``parallel`` suite's per-device figures, one row per case (see ``bench/suites/parallel.py``).

    ``mem vs 1`` and ``time vs 1`` divide by the single-device case (the peer)
    of the same shape in the same run; ``-`` where it or a figure is missing.
    """
    records = [r for r in results if r["suite"] == "parallel" and r["status"] == "ok"]
    peers = {_params_key(r): r for r in records if r["peer"]}
    rows = []
    for r in records:
        m = r.get("metrics") or {}
        single = (peers.get(_params_key(r)) or {}).get("metrics") or {}
        mem, single_mem = m.get("memory_bytes"), single.get("memory_bytes")
        rows.append(
            [
                r["impl"] + (" (peer)" if r["peer"] else ""),
                r["label"],
                fmt_bytes(mem),
                "-" if r["peer"] or not mem or not single_mem else f"{mem / single_mem:.2f}x",
                fmt_number(m.get("visited_max"), ".0f"),
                fmt_number(m.get("visited_mean"), ".1f"),
                fmt_number(m.get("visited_imbalance"), ".2f"),
                fmt_bytes(m.get("bytes_moved")),
                fmt_number(m.get("collective_count")),
                fmt_time(r["median_s"]),
                fmt_number(next(iter(r["ratios"].values()), None), ".2f"),
            ]
        )
    return PARALLEL_HEADERS, rows


def parallel_notes(doc: dict[str, Any]) -> list[str]:
    """What the parallel table's columns are, and what its times are worth on this backend."""
    lines = [
        "Per device: mem = argument + temp bytes of the compiled call; visited = block pairs its kernels visit; "
        "moved = bytes it receives in its `collectives` executions per call (bench/hlo.py). 'vs 1' = over the "
        "single-device blockwise call (peer); no time: compiled only "
        f"(seq > {doc['config'].get('parallel_timed_seq')})."
    ]
    if doc["meta"]["backend"] == "cpu":
        lines.append(
            "CPU devices are simulated (--xla_force_host_platform_device_count) and share the host's cores: "
            "times are not a scaling figure (on real multi-accelerator machines they are)."
        )
    return lines


def _params_key(record: dict[str, Any]) -> str:
    return json.dumps(record["params"], sort_keys=True)


def _is_peer(records: Sequence[dict[str, Any]], impl: str) -> bool:
    return any(r["impl"] == impl and r["peer"] for r in records)


def render_text(table: Table) -> str:
    """Fixed-width columns for the terminal."""
    headers, rows = table
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    line = "  ".join
    out = [line(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out.append(line("-" * w for w in widths))
    out.extend(line(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(s.rstrip() for s in out)


def render_markdown(table: Table) -> str:
    """A GitHub Markdown table."""
    headers, rows = table
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out.extend("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows)
    return "\n".join(out)


def summary(doc: dict[str, Any]) -> str:
    """The terminal report: machine line, results table, failures, roofline."""
    meta = doc["meta"]
    parts = [
        f"backend {meta['backend']} ({meta['device_kind']} x{meta['device_count']}), {meta['cpu_count']} CPUs, "
        f"jax {meta['versions']['jax']}, preset {doc['config']['preset']}",
        render_text(result_rows(doc["results"])),
    ]
    parallel = parallel_rows(doc["results"])
    if parallel[1]:
        parts += ["Sequence parallel:", render_text(parallel), "\n".join(parallel_notes(doc))]
    failures = failure_rows(doc["results"])
    if failures[1]:
        parts += ["Not run:", render_text(failures)]
    if lines := notes(doc["results"]):
        parts += ["Notes:", "\n".join(lines)]
    roof = ", ".join(f"{d} {g:.3g} GFLOP/s" for d, g in doc["roofline_gflops"].items()) or "none"
    parts.append(f"Matmul roofline: {roof}. 'vs peer' = median time / peer's median time (below 1 is faster).")
    return "\n\n".join(parts)
