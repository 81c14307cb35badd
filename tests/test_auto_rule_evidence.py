"""The auto rule's thresholds are the crossovers ``python -m bench.auto_rule`` recorded (committed JSON)."""

import json
import pathlib

import bench.auto_rule
from jattn import _dispatch

EVIDENCE = pathlib.Path(bench.auto_rule.__file__).parent / "results" / "auto-rule-cpu.json"


def test_the_committed_crossovers_follow_from_the_committed_measurements():
    doc = json.loads(EVIDENCE.read_text())
    assert doc["machine"]["backend"] == "cpu"
    assert bench.auto_rule.crossovers(doc["records"]) == doc["crossovers"]


def test_the_cpu_thresholds_are_the_recorded_crossovers():
    crossovers = json.loads(EVIDENCE.read_text())["crossovers"]
    assert crossovers["xla_max_seq"] == _dispatch.XLA_MAX_SEQ
    assert crossovers["reference_max_seq"] ** 2 == _dispatch.REFERENCE_MAX_LOGITS
    assert crossovers["reference_max_kv"] == _dispatch.REFERENCE_MAX_KV
    assert crossovers["decode_xla_max_kv_bytes"] == _dispatch.DECODE_XLA_MAX_KV_BYTES
