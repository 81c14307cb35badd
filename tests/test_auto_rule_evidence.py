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
    seq, shape = doc["crossovers"]["reference_max_seq"], doc["shape"]
    assert shape["batch"] * shape["heads"] * seq**2 == _dispatch.GPU_REFERENCE_MAX_LOGITS  # logits in all
    assert seq == _dispatch.GPU_REFERENCE_MAX_KV


def test_the_gpu_block_sparse_threshold_is_the_shortest_length_where_the_reference_won_every_case():
    doc = json.loads(GPU_EVIDENCE.read_text())
    own = [r for r in doc["records"] if r["option"] in bench.auto_rule.OWN_OPTIONS]
    shortest = min(r["seq"] for r in own)
    at_shortest = [r["results"] for r in own if r["seq"] == shortest]
    assert at_shortest and all(r["jattn:reference"]["median_s"] < r["jattn:blockwise"]["median_s"] for r in at_shortest)
    assert shortest**2 == _dispatch.GPU_BLOCK_SPARSE_MAX_LOGITS


def test_the_gpu_rule_counts_batch_and_heads_and_keeps_block_sparse_calls_blockwise():
    """The reference holds the logits: on GPU its limit is on all of them, and a ``mask_mod`` keeps the blockwise
    kernel, which may skip blocks, past 256 x 256 (``auto_implementation`` on shapes alone, any machine)."""
    import jax
    import jax.numpy as jnp

    import jattn

    def pick(batch, seq, **options):
        q = jax.ShapeDtypeStruct((batch, seq, 8, 64), jnp.float32)
        return jattn.auto_implementation(q, q, q, backend="gpu", logits_soft_cap=30.0, **options)

    picks = [pick(4, 4096), pick(64, 1024), pick(8, 4096), pick(64, 2048), pick(4, 8192)]
    assert picks == ["reference", "reference", "blockwise", "blockwise", "blockwise"]
    causal = jattn.masks.causal()
    assert [pick(1, 256, mask_mod=causal), pick(1, 512, mask_mod=causal)] == ["reference", "blockwise"]
