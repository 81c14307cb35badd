"""The benchmark harness: FLOP counting by hand, derived fields, and one tiny end-to-end run.

No timing is asserted here: the smoke run uses one repeat on tiny shapes and
only checks that every field is there and every case was accounted for.
"""

import dataclasses
import doctest
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

import bench.seed_numpy
import jattn
from bench import __main__ as cli
from bench import report, runner, table
from bench.case import Case, JaxTarget, PythonTarget, Unavailable
from bench.config import PRESETS, BenchConfig
from bench.flops import attention_flops, decode_flops, matmul_flops, module_flops, visible_pairs
from bench.measure import measure
from bench.suites import attention as attention_suite

# ---- FLOP counting, hand-computed -------------------------------------------------


def test_attention_flops_full():
    # 4 * B * H * T * S * D = 4 * 2 * 3 * 5 * 7 * 4
    assert attention_flops(batch=2, heads=3, q_seq=5, kv_seq=7, dim=4) == 3360


def test_attention_flops_causal_square_counts_visible_half_exactly():
    # T = S = 4: rows see 1 + 2 + 3 + 4 = 10 keys; 2 * 1 * 1 * 10 * (8 + 8)
    assert visible_pairs(4, 4, causal=True) == 10
    assert attention_flops(batch=1, heads=1, q_seq=4, kv_seq=4, dim=8, causal=True) == 320


@pytest.mark.parametrize(("q_seq", "kv_seq", "pairs"), [(5, 3, 1 + 2 + 3 + 3 + 3), (3, 5, 1 + 2 + 3), (7, 7, 28)])
def test_causal_pairs_cross_lengths(q_seq, kv_seq, pairs):
    assert visible_pairs(q_seq, kv_seq, causal=True) == pairs
    # same convention as jattn's causal mask (top-left aligned)
    assert int(jattn.masks.materialize(jattn.masks.causal(), q_seq, kv_seq).sum()) == pairs


def test_cross_attention_uses_q_seq_times_kv_seq():
    assert visible_pairs(3, 11, causal=False) == 33
    assert attention_flops(batch=1, heads=2, q_seq=3, kv_seq=11, dim=5) == 4 * 2 * 3 * 11 * 5


def test_gqa_does_not_change_flops_per_query_head():
    # 4 * 1 * 8 * 16 * 16 * 64, whatever the number of kv heads
    counts = {attention_flops(batch=1, heads=8, kv_heads=kv, q_seq=16, kv_seq=16, dim=64) for kv in (None, 1, 2, 8)}
    assert counts == {524288}


def test_backward_is_two_and_a_half_forwards():
    assert attention_flops(batch=2, heads=3, q_seq=5, kv_seq=7, dim=4, mode="fwd+bwd") == 3360 * 7 // 2
    assert (
        attention_flops(batch=1, heads=1, q_seq=4, kv_seq=4, dim=8, causal=True, mode="fwd+bwd", backward_factor=2.0)
        == 960
    )


def test_v_dim_and_matmul_and_module_flops():
    assert attention_flops(batch=1, heads=1, q_seq=2, kv_seq=3, dim=4, v_dim=6) == 2 * 6 * (4 + 6)
    assert matmul_flops(2, 3, 5) == 60
    assert matmul_flops(2, 3, 5, batch=7) == 420
    # 3 input projections 2*T*F*F, output 2*T*F*F, attention 4*H*T*T*Dh; T=5, F=6, H=2, Dh=3
    assert module_flops(batch=1, seq=5, features=6, heads=2, head_dim=3) == 4 * 2 * 5 * 6 * 6 + 4 * 2 * 5 * 5 * 3


def test_decode_flops_one_token_over_fill_plus_one_keys():
    # projections 4 * 2 * F * F (F=6, H*Dh=6); attention 4 * H * 1 * (fill + 1) * Dh, fill=3, H=2, Dh=3
    assert decode_flops(batch=1, fill=3, features=6, heads=2, head_dim=3) == 4 * 2 * 6 * 6 + 4 * 2 * 4 * 3


def test_flop_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_flops(batch=1, heads=1, q_seq=1, kv_seq=1, dim=1, mode="bwd")
    with pytest.raises(ValueError, match="heads=6, kv_heads=4"):
        attention_flops(batch=1, heads=6, kv_heads=4, q_seq=1, kv_seq=1, dim=1)


# ---- runner pieces without timing -------------------------------------------------


def _record(impl, median, *, peer=False, suite="attention", flops=100, dtype="float32", status="ok"):
    return {"suite": suite, "impl": impl, "peer": peer, "params": {"dtype": dtype, "seq": 3}, "flops": flops,
            "status": status, "median_s": median, "min_s": median, "label": "x"}  # fmt: skip


def test_add_derived_ratios_and_roofline():
    results = [
        _record("jax:matmul", 1e-9, suite="matmul", flops=400),  # 400 GFLOP/s
        _record("jax.nn:xla", 2e-9, peer=True),
        _record("jattn:reference", 1e-9),
        _record("jattn:broken", None, status="error"),
    ]
    roof = runner.add_derived(results)
    assert roof == {"float32": pytest.approx(400)}
    mine = results[2]
    assert mine["gflops"] == pytest.approx(100)
    assert mine["roofline_pct"] == pytest.approx(25)
    assert mine["ratios"] == {"jax.nn:xla": pytest.approx(0.5)}
    assert results[1]["ratios"] == {}
    assert results[3]["gflops"] is None and results[3]["ratios"] == {}


def test_run_case_records_errors_and_unavailable():
    def broken():
        raise RuntimeError("cuDNN is not detected.\nmore detail")

    def missing():
        raise Unavailable("not here")

    base = {"suite": "s", "impl": "i", "label": "l", "params": {}, "flops": None}
    err = runner.run_case(Case(**base, build=broken), repeats=1, warmup=0)
    assert err["status"] == "error" and err["error"] == "RuntimeError: cuDNN is not detected."
    gone = runner.run_case(Case(**base, build=missing), repeats=1, warmup=0)
    assert gone["status"] == "unavailable" and gone["error"] == "not here"


def test_measure_fields():
    out = measure(JaxTarget(lambda x: x * 2, (jax.numpy.ones(3),)), repeats=2, warmup=0)
    assert set(out) == {"compile_s", "temp_bytes", "metrics", "times_s", "median_s", "min_s", "max_s", "repeats"}
    assert len(out["times_s"]) == 2 and out["compile_s"] > 0 and out["metrics"] == {}
    shape = jax.ShapeDtypeStruct((3,), jax.numpy.float32)
    only = measure(JaxTarget(lambda x: x * 2, (shape,), compiled_metrics=lambda c: {"n": 1}, timed=False), repeats=1,
                   warmup=0)  # fmt: skip
    assert only["metrics"] == {"n": 1} and only["times_s"] == [] and only["median_s"] is None and only["repeats"] == 0
    py = measure(PythonTarget(sum, ([1, 2],)), repeats=1, warmup=0)
    assert py["compile_s"] is None and py["temp_bytes"] is None
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure(PythonTarget(sum, ([1],)), repeats=0, warmup=0)


def test_new_jattn_implementations_are_picked_up(monkeypatch):
    monkeypatch.setattr(jattn, "IMPLEMENTATIONS", (*jattn.IMPLEMENTATIONS, "blockwise"))
    labels = dict(attention_suite.implementation_labels("cpu", torch_importable=False))
    assert labels["jattn:blockwise"] is False and labels["jax.nn:xla"] is True
    assert "jax.nn:cudnn" not in labels and "torch:sdpa" not in labels
    assert "jax.nn:cudnn" in dict(attention_suite.implementation_labels("gpu", torch_importable=True))


def test_config_patterns_and_presets():
    cfg = BenchConfig(impls=("reference", "jax.nn:*"))
    assert cfg.wants("jattn:reference") and cfg.wants("jax.nn:cudnn")
    assert not cfg.wants("jattn:xla") and BenchConfig().wants("anything")
    assert PRESETS["quick"].repeats >= 5 and PRESETS["full"].repeats >= 5


def test_formatting_and_readme_region():
    assert (table.fmt_time(2.5e-6), table.fmt_time(0.0123), table.fmt_time(3.0)) == ("2.5 us", "12.3 ms", "3 s")
    assert table.fmt_bytes(None) == "-" and table.fmt_bytes(3 * 2**20) == "3.0 MiB"
    text = "a\n<!-- perf:start -->\nold\n<!-- perf:end -->\nb\n"
    assert report.replace_region(text, "new") == "a\n<!-- perf:start -->\nnew\n<!-- perf:end -->\nb\n"
    with pytest.raises(ValueError, match="perf:start"):
        report.replace_region("no markers", "new")


def test_module_weights_are_copied_when_paths_match():
    from flax import nnx

    from bench.suites import module as module_suite

    def mha(heads, seed):
        return nnx.MultiHeadAttention(num_heads=heads, in_features=4, qkv_features=4, decode=False, rngs=nnx.Rngs(seed))

    src, dst = mha(2, 0), mha(2, 1)
    assert module_suite.copy_weights(src, dst) == "weights copied from the flax module"
    for path, value in module_suite.param_arrays(src).items():
        assert (module_suite.param_arrays(dst)[path] == value).all()
    assert module_suite.copy_weights(src, mha(4, 0)).startswith("weights not copied (parameters differ")


def test_decode_suite_matches_flax_and_records_fields():
    from bench.suites import decode as decode_suite

    cfg = BenchConfig(decode_max_length=64, decode_fills=(8, 63), module_features=16, module_heads=2)
    cases = list(decode_suite.cases(cfg))
    assert [(c.impl, c.params["fill"], c.peer) for c in cases] == [
        ("flax.nnx:MultiHeadAttention", 8, True), ("jattn.nnx:MultiHeadAttention", 8, False),
        ("flax.nnx:MultiHeadAttention", 63, True), ("jattn.nnx:MultiHeadAttention", 63, False),
    ]  # fmt: skip
    results = [runner.run_case(c, repeats=2, warmup=1) for c in cases]
    runner.add_derived(results)
    for r in results:
        assert r["status"] == "ok", r["error"]
        assert r["params"] == {"batch": 1, "max_length": 64, "fill": r["params"]["fill"], "features": 16,
                               "heads": 2, "dtype": "float32"}  # fmt: skip
        assert r["flops"] == decode_flops(batch=1, fill=r["params"]["fill"], features=16, heads=2, head_dim=8)
        assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["gflops"] > 0
        assert r["notes"]["compile_s"] > 0 and "temp_bytes" in r["notes"]
    for mine in results[1::2]:
        assert mine["ratios"].keys() == {"flax.nnx:MultiHeadAttention"}
        assert mine["notes"]["weights"] == "weights copied from the flax module"
        # one query over jattn.nnx's cache of 64 keys: the one-query form of "reference" (_dispatch.choose)
        assert mine["notes"]["implementation"] == "reference"
        assert mine["notes"]["max_abs_diff_vs_flax"] <= 1e-5
    with pytest.raises(ValueError, match=r"fill must lie in \[1, max_length\)"):
        decode_suite.build("jattn.nnx:MultiHeadAttention", {**cases[0].params, "fill": 64})


def test_flex_suite_runs_and_compares_with_its_peers():
    from bench.suites import flex as flex_suite

    cfg = BenchConfig(flex_seq=32, flex_doc_seq=64, flex_docs=4, heads=2, dim=4)
    cases = list(flex_suite.cases(cfg))
    assert [c.impl for c in cases] == [
        "jattn:blockwise", "jattn:blockwise+score_mod", "jattn:blockwise", "jattn:blockwise+score_mod",
        "jax.nn:xla+dense_mask", "jattn:blockwise+dense_mask", "jattn:blockwise+mask_mod",
    ]  # fmt: skip
    results = [runner.run_case(c, repeats=1, warmup=0) for c in cases]
    runner.add_derived(results)
    for r in results:
        assert r["status"] == "ok", r["error"]
    assert results[1]["ratios"].keys() == {"jattn:blockwise"}
    assert results[6]["ratios"].keys() == {"jax.nn:xla+dense_mask"}
    assert results[6]["notes"]["visited_blocks"] == 1  # 64 positions fit one (512-position) block
    for case in cases[4:]:  # masks are arguments, as in a model: never a (seq, seq) constant for XLA to fold
        target = case.build()
        hlo = jax.jit(target.fn).lower(*target.args).compile().as_text()
        assert _largest_constant(hlo) < 64 * 64, case.impl


def _largest_constant(hlo: str) -> int:
    """Elements of the largest array constant in an HLO module's text."""
    sizes = [1]
    for dims in re.findall(r"= \w+\[([\d,]*)\]\S* constant\(", hlo):
        sizes.append(math.prod(int(d) for d in dims.split(",") if d))
    return max(sizes)


def test_seed_numpy_doctests():
    assert doctest.testmod(bench.seed_numpy).failed == 0


# ---- one tiny end-to-end run through the CLI --------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--seq", "8", "--heads", "2", "--dim", "4", "--causal", "yes", "--repeats", "1",
            "--warmup", "0", "--module-seq", "4", "--impl", "reference", "cudnn", "jax.nn:*", "*:notebook",
            "jattn:attention", "*:MultiHeadAttention", "jattn.nnx:*", "--name", "smoke", "--out-dir", str(out),
            "--no-progress"]  # fmt: skip
    cfg = cli.config_from_args(cli.parser().parse_args(argv))
    small = {"matmul_sizes": (8,), "module_features": 8, "module_heads": 2, "seed_sizes": (("single", 2, 3),),
             "decode_max_length": 8, "decode_fills": (4,)}  # fmt: skip
    cfg = dataclasses.replace(cfg, **small)
    doc = runner.run_benchmarks(cfg, progress=False, argv=argv)
    path = out / "smoke.json"
    path.write_text(json.dumps(doc))
    return path, json.loads(path.read_text())


def test_smoke_results_fields(smoke):
    _, doc = smoke
    assert {"version", "meta", "config", "roofline_gflops", "results"} <= set(doc)
    meta = doc["meta"]
    assert meta["backend"] == jax.default_backend() and meta["device_kind"] and meta["cpu_count"] >= 1
    assert meta["versions"]["jax"] == jax.__version__ and "flop_convention" in meta
    assert doc["roofline_gflops"]["float32"] > 0
    ok_fields = {"compile_s", "median_s", "min_s", "max_s", "times_s", "gflops", "roofline_pct", "temp_bytes", "ratios"}
    by_impl = {}
    for r in doc["results"]:
        assert r["status"] in ("ok", "error", "unavailable")
        if r["status"] == "ok":
            assert ok_fields <= set(r) and r["min_s"] <= r["median_s"] <= r["max_s"]
        else:
            assert r["error"]
        by_impl.setdefault((r["suite"], r["impl"]), []).append(r)
    ref = by_impl[("attention", "jattn:reference")]
    assert {(r["params"]["mode"], r["params"]["causal"]) for r in ref} == {("fwd", True), ("fwd+bwd", True)}
    assert all(r["status"] == "ok" and "jax.nn:xla" in r["ratios"] for r in ref)
    assert ref[0]["flops"] == attention_flops(batch=1, heads=2, q_seq=8, kv_seq=8, dim=4, causal=True)
    if jax.default_backend() == "cpu":
        assert all(r["status"] == "error" for r in by_impl[("attention", "jattn:cudnn")])
    assert by_impl[("seed", "jattn:attention")][0]["ratios"].keys() == {"numpy:notebook"}
    assert by_impl[("module", "flax.nnx:MultiHeadAttention")][0]["status"] == "ok"
    assert by_impl[("module", "jattn.nnx:MultiHeadAttention")][0]["status"] in ("ok", "unavailable")
    decoded = by_impl[("decode", "jattn.nnx:MultiHeadAttention")][0]
    assert decoded["status"] == "ok" and decoded["ratios"].keys() == {"flax.nnx:MultiHeadAttention"}


def test_smoke_table_plot_and_report(smoke, tmp_path):
    path, doc = smoke
    text = table.summary(doc)
    assert "jattn:reference" in text and "Not run:" in text
    from bench import plot

    png = plot.plot_attention(doc, path.with_suffix(".png"))
    assert png.stat().st_size > 0
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- perf:start -->\n<!-- perf:end -->\n")
    assert report.main([str(path), "--readme", str(readme)]) == 0
    section = readme.read_text()
    assert "## Performance" in section and f"quick {jax.default_backend().upper()} run" in section
    assert "smoke.png)" in section and "| case | jattn:reference | jax.nn:xla (peer) |" in section


def test_parallel_suite_cases_and_one_tiny_case():
    from bench.suites import parallel as parallel_suite

    cfg = BenchConfig(seq_lengths=(32, 64), heads=2, dim=4, modes=("fwd", "jvp"), causal=(True,), parallel_timed_seq=32)
    cases = list(parallel_suite.cases(cfg))
    devices = jax.device_count()
    if devices < 2:  # the default here: one case that says why, recorded as unavailable
        [case] = cases
        record = runner.run_case(case, repeats=1, warmup=0)
        assert record["status"] == "unavailable" and "2 or more devices" in record["error"]
    else:  # jvp is not a parallel mode; the single device first in each group, as the peer
        assert [(c.impl, c.params["seq"], c.peer) for c in cases[:5]] == [
            ("jattn:blockwise", 32, True), ("jattn:ring", 32, False), ("jattn:ring+zigzag", 32, False),
            ("jattn:all_gather", 32, False), ("jattn:all_gather+zigzag", 32, False),
        ]  # fmt: skip
        assert len(cases) == 10 and {c.params["devices"] for c in cases} == {devices}
    # one tiny case of each kind on a one-device mesh (it runs anywhere): a timed ring, a compiled-only peer
    params = {"mode": "fwd", "causal": True, "batch": 1, "seq": 32, "kv_seq": 32, "heads": 2, "kv_heads": 2,
              "dim": 4, "dtype": "float32", "devices": 1}  # fmt: skip

    def build(impl, *, timed):
        return lambda: parallel_suite.build(impl, params, timed=timed)

    peer = Case("parallel", "jattn:blockwise", "x", params, 1, build("jattn:blockwise", timed=False), peer=True)
    mine = Case("parallel", "jattn:ring+zigzag", "x", params, 1, build("jattn:ring+zigzag", timed=True))
    results = [runner.run_case(c, repeats=1, warmup=0) for c in (peer, mine)]
    runner.add_derived(results)
    for r in results:
        assert r["status"] == "ok", r["error"]
        m = r["metrics"]
        assert m["memory_bytes"] == m["argument_bytes"] + m["temp_bytes"] > 0
        assert m["argument_bytes"] == 3 * 32 * 2 * 4 * 4  # q, k, v of (1, 32, 2, 4) float32
        assert m["collective_count"] == 0 and m["bytes_moved"] == 0  # one device: nothing to move
        assert m["visited_max"] == m["visited_mean"] and m["visited_imbalance"] == 1
    # one block on one device; zigzag cuts it in two chunks of 16: causal chunk pairs (0, 0), (1, 0), (1, 1)
    assert (results[0]["metrics"]["visited_max"], results[1]["metrics"]["visited_max"]) == (1, 3)
    assert results[0]["median_s"] is None and results[0]["times_s"] == []  # compiled only
    assert results[1]["median_s"] > 0 and results[1]["ratios"] == {}  # no timed peer, no ratio
    headers, rows = table.parallel_rows(results)
    assert [row[headers.index("median")] == "-" for row in rows] == [True, False]
    assert rows[1][headers.index("mem vs 1")].endswith("x")


def test_quick_flex_cases_log_no_xla_errors_or_warnings(tmp_path):
    """`python -m bench --quick` must not print what a user reads as a crash: no XLA error/warning log line
    (e.g. the slow constant-folding alarm a mask closed over as a constant set off) and no Python warning."""
    argv = ["--quick", "--suite", "flex", "--repeats", "1", "--warmup", "0", "--no-plot", "--no-progress",
            "--out-dir", str(tmp_path)]  # fmt: skip
    root = pathlib.Path(bench.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONWARNINGS": "default", "TF_CPP_MIN_LOG_LEVEL": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "bench", *argv], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [line for line in result.stderr.splitlines() if re.match(r"^[EW]\d{4} |.*Warning\b", line)]
    assert not logged, logged
