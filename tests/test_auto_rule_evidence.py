"""The auto rule's thresholds are the crossovers ``python -m bench.auto_rule`` recorded (committed JSON)."""

import json
import pathlib

import bench.auto_rule
from jattn import _dispatch

RESULTS = pathlib.Path(bench.auto_rule.__file__).parent / "results"
EVIDENCE = RESULTS / "auto-rule-cpu.json"
GPU_EVIDENCE = RESULTS / "auto-rule-gpu.json"


def test_the_committed_crossovers_follow_from_the_committed_measurements():
    for path, backend in ((EVIDENCE, "cpu"), (GPU_EVIDENCE, "gpu")):
        doc = json.loads(path.read_text())
        assert doc["machine"]["backend"] == backend
        assert bench.auto_rule.crossovers(doc["records"]) == doc["crossovers"]


def test_the_cpu_thresholds_are_the_recorded_crossovers():
    crossovers = json.loads(EVIDENCE.read_text())["crossovers"]
    assert crossovers["xla_max_seq"] == _dispatch.XLA_MAX_SEQ
    assert crossovers["reference_max_seq"] ** 2 == _dispatch.REFERENCE_MAX_LOGITS
    assert crossovers["reference_max_kv"] == _dispatch.REFERENCE_MAX_KV
    assert crossovers["decode_xla_max_kv_bytes"] == _dispatch.DECODE_XLA_MAX_KV_BYTES


def test_the_gpu_rule_follows_the_gpu_run():
    """On GPU the rule delegates wherever jax.nn is exact, at any length: that needs the blockwise kernel to
    have been slower than XLA at the longest length the run measured (else there is a crossover to obey).
    And the reference's thresholds are the run's ``reference_max_seq``, squared, and itself for the keys."""
    doc = json.loads(GPU_EVIDENCE.read_text())
    longest = max(r["seq"] for r in doc["records"] if r["option"] != "decode")
    assert doc["crossovers"]["xla_max_seq"] == longest
    assert doc["crossovers"]["reference_max_seq"] ** 2 == _dispatch.GPU_REFERENCE_MAX_LOGITS
    assert doc["crossovers"]["reference_max_seq"] == _dispatch.GPU_REFERENCE_MAX_KV
