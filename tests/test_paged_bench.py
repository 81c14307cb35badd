"""The ``serve`` bench suite: its cases and one tiny measured case per kind (not a benchmark)."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from bench.config import PRESETS
from bench.measure import measure
from bench.suites import serve


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(
        PRESETS["quick"], suites=("serve",), heads=2, dim=4, serve_kv_lens=(128, 64), serve_scaling=(64,)
    )


def test_cases_cover_decode_gqa_scaling_and_mixed(cfg):
    cases = list(serve.cases(cfg))
    labels = {c.label for c in cases}
    assert labels == {
        "decode 16 seqs kv=1x128+15x64 H=2/2",
        "decode 16 seqs kv=1x128+15x64 H=2/1",
        "decode 16 seqs kv=16x64 H=2/2",
        "mixed 2 prefill x64 (kv 128,64) + 14 decode (kv 64) H=2/2",
    }
    assert {(c.impl, c.peer) for c in cases} == {(serve.PAGED, False)} | {(i, True) for i in serve.IMPLS[1:]}


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_paged_case_runs_and_agrees_with_the_padded_cache(cfg, kind):
    case = next(c for c in serve.cases(cfg) if c.params["kind"] == kind and c.impl == serve.PAGED)
    target = case.build()
    assert target.notes["max_abs_diff_vs_padded"] < 1e-5
    assert measure(target, repeats=1, warmup=0)["median_s"] > 0


def test_padded_peers_build_and_run(cfg):
    for impl in serve.IMPLS[1:]:
        case = next(c for c in serve.cases(cfg) if c.params["kind"] == "mixed" and c.impl == impl)
        # jax.nn wants int32 query_seq_lengths but compares them with its own int64 arange when x64 is on
        # (as in the tests), which strict promotion refuses; a bench run uses the default promotion.
        with jax.numpy_dtype_promotion("standard"):
            assert measure(case.build(), repeats=1, warmup=0)["median_s"] > 0
