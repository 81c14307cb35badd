"""Two processes on localhost, 4 CPU devices each, joined by ``jax.distributed.initialize`` (gloo collectives):
sequence-parallel attention (ring, all-gather, both layouts, and the automatic rule), a score_mod and an NNX
module on a mesh that spans both processes equal one process's single-device result. The same command
runs it by hand: ``python tests/conformance/multihost_worker.py 0 PORT & python ... 1 PORT``."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

import jattn

WORKER = pathlib.Path(__file__).parent / "conformance" / "multihost_worker.py"
CHECKS = ["ring-contiguous", "ring-zigzag", "all_gather-contiguous", "all_gather-zigzag", "auto", "score_mod", "nnx"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def multihost_results():
    root = pathlib.Path(jattn.__file__).resolve().parent.parent
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(i), port], env=env, cwd=root, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    line = next(line for line in outputs[0][0].splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.xdist_group("multihost")
@pytest.mark.parametrize("check", CHECKS)
def test_two_processes_match_one_device(multihost_results, check):
    assert multihost_results[check] == "ok", multihost_results[check]
