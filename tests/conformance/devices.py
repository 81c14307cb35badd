"""Running a check script on several simulated CPU devices (JAX fixes the device count at start-up)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jattn


def run_on_cpu_devices(script: str, count: int, *args: str) -> dict:
    """Runs ``script`` in a subprocess with ``count`` CPU devices; returns the JSON it printed after ``RESULTS``.

    See :func:`run_with_log` for the same with the subprocess's standard error (XLA's log lines).
    """
    return run_with_log(script, count, *args)[0]


def run_with_log(script: str, count: int, *args: str) -> tuple[dict, str]:
    """``(results, stderr)`` of ``script`` on ``count`` CPU devices, as :func:`run_on_cpu_devices`.

    The subprocess gets this process's XLA flags (the suite's compile settings) plus the device count, and
    the repository root on its path (``jattn`` and ``bench`` import).
    """
    root = pathlib.Path(jattn.__file__).resolve().parent.parent
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300, cwd=root
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS ")), result.stderr
