"""Runs cases one by one, records failures, then adds GFLOP/s, roofline percent and peer ratios."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import jax

from . import flops
from .case import Case, Unavailable
from .config import BenchConfig
from .measure import measure
from .suites import SUITES

RESULTS_VERSION = 1


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Backend, device and library versions of this process."""
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "numpy", "torch", "jattn")},
        "x64": bool(jax.config.jax_enable_x64),
    }


def short_error(e: BaseException, *, limit: int = 300) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_case(case: Case, *, repeats: int, warmup: int) -> dict[str, Any]:
    """Measures one case; never raises (failures become ``status`` ``"error"`` or ``"unavailable"``)."""
    record: dict[str, Any] = {
        "suite": case.suite,
        "impl": case.impl,
        "label": case.label,
        "peer": case.peer,
        "params": dict(case.params),
        "flops": case.flops,
        "status": "ok",
        "error": None,
        "notes": {},
        "metrics": {},
    }
    try:
        target = case.build()
        record["notes"] = dict(target.notes)
        record.update(measure(target, repeats=repeats, warmup=warmup))
    except Unavailable as e:
        record.update(status="unavailable", error=str(e))
    except Exception as e:  # out of memory, unsupported on this backend, a bug: record it and go on
        record.update(status="error", error=short_error(e))
    return record


def roofline(results: Iterable[dict]) -> dict[str, float]:
    """Best matmul GFLOP/s of the run, per dtype: the fastest single call of any matmul case.

    The fastest call rather than the median: the roofline is a ceiling, and on a
    shared machine the median of a short matmul is mostly noise.
    """
    best: dict[str, float] = {}
    for r in results:
        if r["suite"] == "matmul" and r["status"] == "ok" and r["flops"] and r["min_s"]:
            dtype = r["params"]["dtype"]
            best[dtype] = max(best.get(dtype, 0.0), r["flops"] / r["min_s"] / 1e9)
    return best


def group_key(record: dict) -> str:
    """Records with the same key measure the same work (same suite and params)."""
    return json.dumps([record["suite"], record["params"]], sort_keys=True)


def add_derived(results: list[dict]) -> dict[str, float]:
    """Adds ``gflops``, ``roofline_pct`` and ``ratios`` to each record in place; returns the roofline.

    ``ratios[peer]`` is this record's median time over the peer's, measured in
    the same run on the same work: below 1 means faster than the peer. Peers get
    no ratios.
    """
    for r in results:
        ok = r["status"] == "ok" and r["flops"] and r["median_s"]
        r["gflops"] = r["flops"] / r["median_s"] / 1e9 if ok else None
    roof = roofline(results)
    peers: dict[str, list[dict]] = {}
    for r in results:
        if r["peer"] and r["status"] == "ok":
            peers.setdefault(group_key(r), []).append(r)
    for r in results:
        peak = roof.get(r["params"].get("dtype"))
        r["roofline_pct"] = 100 * r["gflops"] / peak if r["gflops"] and peak and r["suite"] != "matmul" else None
        r["ratios"] = {}
        if r["status"] == "ok" and not r["peer"] and r["median_s"]:  # compiled-only cases have no time
            timed_peers = (p for p in peers.get(group_key(r), []) if p["median_s"])
            r["ratios"] = {p["impl"]: r["median_s"] / p["median_s"] for p in timed_peers}
    return roof


def select_cases(cfg: BenchConfig) -> list[Case]:
    """The run's cases, matmul (the roofline) first."""
    unknown = [s for s in cfg.suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suites {unknown}; choose from {sorted(SUITES)}")
    order = ["matmul", *(s for s in cfg.suites if s != "matmul")]
    return [case for suite in order for case in SUITES[suite](cfg)]


def run_benchmarks(cfg: BenchConfig, *, progress: bool = True, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every selected case and returns the results document (what goes to JSON).

    Args:
        cfg: what to run.
        progress: show a tqdm progress bar (on stderr).
        argv: command line to record, if any.

    Returns:
        ``{"version", "meta", "config", "roofline_gflops", "results"}``.
    """
    from tqdm import tqdm

    cases = select_cases(cfg)
    results = []
    with tqdm(cases, desc="bench", unit="case", disable=not progress, dynamic_ncols=True) as bar:
        for case in bar:
            bar.set_postfix_str(f"{case.suite} {case.impl} {case.label}", refresh=False)
            results.append(run_case(case, repeats=cfg.repeats, warmup=cfg.warmup))
    roof = add_derived(results)
    meta = machine_info()
    meta.update(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        argv=list(argv) if argv is not None else None,
        flop_convention=" ".join((flops.__doc__ or "").split()),
    )
    return {
        "version": RESULTS_VERSION,
        "meta": meta,
        "config": dataclasses.asdict(cfg),
        "roofline_gflops": roof,
        "results": results,
    }
