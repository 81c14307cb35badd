"""``python -m bench.auto_rule``: the measurements behind ``jattn``'s auto rule, in interleaved rounds.

For each sequence length, option set, mode and dtype, the contenders — ``jax.nn``'s XLA attention (the
peer), jattn's ``blockwise`` kernel and jattn's materialized ``reference`` — are compiled once and then
timed round-robin (A B C A B C ...), so a noisy shared machine slows them alike. The result (medians,
ratios to ``jax.nn`` and the crossovers the rule's thresholds are read from) is written as a small JSON
file that is committed (``bench/results/auto-rule-<backend>.json``), and ``jattn/_dispatch.py``'s
thresholds cite it; ``tests/test_auto_rule_evidence.py`` checks that they agree.

Options: ``none``, ``causal``, ``lengths`` (``key_value_seq_lengths``, every example filled to 3/4),
``gqa`` (2 key/value heads), ``mask`` (a boolean padding mask, 3/4 visible), ``segments`` (two
packed sequences; ``jax.nn`` gets the same mask dense, as a user without segment ids would pass it),
``bias`` (a float bias), ``soft_cap`` (``logits_soft_cap=30``; jax.nn has none, so it runs plain) and
``decode`` (one query over ``seq`` cached keys filled to half: ``key_value_seq_lengths``).

``--keep EARLIER.json`` refreshes part of a result: the earlier run's records of cases this run does not
measure are kept, each marked with the command that measured it (for a device lent for minutes, where the
whole sweep does not fit in one call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from .hlo import program_id
from .runner import machine_info

RESULTS_DIR = Path(__file__).parent / "results"
OPTIONS = ("none", "causal", "lengths", "gqa", "mask", "segments", "bias", "soft_cap", "decode")
EXACT_WITH_JAX_NN = ("none", "causal", "lengths", "gqa", "mask", "segments", "decode")  # segments: a dense mask
OWN_OPTIONS = ("bias", "soft_cap")  # auto runs jattn's own paths (jax.nn: NaN rows under -inf bias; no soft cap)
CONTENDERS = ("jax.nn:xla", "jattn:blockwise", "jattn:reference")


def _inputs(option: str, seq: int, dtype, shape: dict) -> tuple[tuple, dict, dict]:
    """(q, k, v), jattn's keyword options and jax.nn's for one case (the same attention)."""
    batch, heads, dim = shape["batch"], shape["heads"], shape["dim"]
    kv_heads = 2 if option == "gqa" else heads
    keys = jax.random.split(jax.random.key(seq), 3)
    q = jax.random.normal(keys[0], (batch, 1 if option == "decode" else seq, heads, dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), dtype)
    filled = jnp.full((batch,), 3 * seq // 4, jnp.int32)
    ids = (jnp.arange(seq) >= seq // 2).astype(jnp.int32)[None].repeat(batch, 0)
    match option:
        case "causal":
            return (q, k, v), {"is_causal": True}, {"is_causal": True}
        case "lengths":
            return (q, k, v), {"key_value_seq_lengths": filled}, {"key_value_seq_lengths": filled}
        case "decode":
            half = jnp.full((batch,), seq // 2, jnp.int32)
            return (q, k, v), {"key_value_seq_lengths": half}, {"key_value_seq_lengths": half}
        case "mask":
            mask = (jnp.arange(seq) < 3 * seq // 4)[None, None, None, :].repeat(batch, 0)
            return (q, k, v), {"mask": mask}, {"mask": mask}
        case "segments":
            dense = (ids[:, :, None] == ids[:, None, :])[:, None]
            return (q, k, v), {"query_segment_ids": ids, "key_value_segment_ids": ids}, {"mask": dense}
        case "bias":
            bias = jax.random.normal(keys[0], (batch, heads, seq, seq), dtype)
            return (q, k, v), {"bias": bias}, {"bias": bias}
        case "soft_cap":
            return (q, k, v), {"logits_soft_cap": 30.0}, {}
    return (q, k, v), {}, {}


def _contender(name: str, mode: str, options: dict):
    """A jitted ``f(q, k, v, arrays)`` for one contender and mode: bool options are static, the array ones
    arguments (closed over, XLA would fold them as constants)."""
    library, impl = name.split(":")
    static = {key: value for key, value in options.items() if isinstance(value, bool | float)}

    def attend(q, k, v, arrays):
        if library == "jax.nn":
            with jax.numpy_dtype_promotion("standard"):
                return jax.nn.dot_product_attention(q, k, v, **static, **arrays, implementation=impl)
        import jattn

        return jattn.dot_product_attention(q, k, v, **static, **arrays, implementation=None if impl == "auto" else impl)

    if mode == "fwd":
        return jax.jit(attend)

    def loss(q, k, v, arrays):
        return jnp.sum(attend(q, k, v, arrays).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _arrays(options: dict) -> dict:
    return {key: value for key, value in options.items() if not isinstance(value, bool | float)}


def calls_per_sample(calls: dict, min_sample_s: float) -> int:
    """How many back-to-back calls one timed sample makes so that it lasts ``min_sample_s`` (at least 1): a
    sample of a sub-millisecond call is mostly timer and dispatch jitter."""
    if min_sample_s <= 0:
        return 1
    fastest = float("inf")
    for call in calls.values():
        start = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - start)
    return max(1, min(1000, round(min_sample_s / max(fastest, 1e-6))))


def interleave(calls: dict, *, rounds: int, min_sample_s: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each blocking ``calls[name]()``, timed round-robin (A B C A B C ...)."""
    for call in calls.values():
        call()  # warm-up
    inner = calls_per_sample(calls, min_sample_s)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(inner):
                call()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_group(args: tuple, contenders: dict, *, rounds: int, min_sample_s: float = 0.0) -> dict[str, Any]:
    """Compiles each contender, then times them round-robin; medians and compile seconds per contender."""
    compiled, out = {}, {}
    for name, (fn, options) in contenders.items():
        start = time.perf_counter()
        try:
            compiled[name] = (fn.lower(*args, options).compile(), options)
            out[name] = {"compile_s": time.perf_counter() - start, "program": program_id(compiled[name][0].as_text())}
        except Exception as e:  # e.g. jax.nn refusing an option: recorded, not fatal
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    calls = {name: (lambda c=c, o=o: jax.block_until_ready(c(*args, o))) for name, (c, o) in compiled.items()}
    for name, median in interleave(calls, rounds=rounds, min_sample_s=min_sample_s).items():
        out[name]["median_s"] = median
    return out


def run(seqs, options, modes, dtypes, *, shape: dict, rounds: int, progress: bool, names=CONTENDERS,
        min_sample_s: float = 0.0, on_record=None) -> list[dict]:  # fmt: skip
    """One record per (seq, option, mode, dtype) group (``decode`` over ``shape["decode_seq"]`` caches);
    ``on_record(records)`` is called with the records so far after each one (to save a partial run)."""
    records = []
    for dtype in dtypes:
        for option in options:
            for mode in modes:
                for seq in shape["decode_seq"] if option == "decode" else seqs:
                    args, ours, theirs = _inputs(option, seq, jnp.dtype(dtype), shape)
                    group = {}
                    for name in names:
                        if name == "jattn:reference" and seq > shape["reference_max_seq"] and option != "decode":
                            continue
                        given = theirs if name.startswith("jax.nn") else ours
                        group[name] = (_contender(name, mode, given), _arrays(given))
                    result = measure_group(args[:3], group, rounds=rounds, min_sample_s=min_sample_s)
                    peer = result["jax.nn:xla"].get("median_s")
                    for r in result.values():
                        if peer and r.get("median_s"):
                            r["vs_jax_nn"] = r["median_s"] / peer
                    record = {"seq": seq, "option": option, "mode": mode, "dtype": dtype, "results": result}
                    if option == "decode":
                        record["kv_bytes"] = kv_bytes(record, shape)
                    records.append(record)
                    if on_record is not None:
                        on_record(records)
                    if progress:
                        ratios = {n: round(r.get("vs_jax_nn", float("nan")), 2) for n, r in result.items()}
                        print(f"{dtype:8} {option:8} {mode:7} T={seq:<5} {ratios}", flush=True)
    return records


def crossovers(records: list[dict]) -> dict[str, int]:
    """The sequence lengths the auto rule's thresholds are read from.

    * ``xla_max_seq``: the longest sequence at which the blockwise kernel was more than 5% slower than
      ``jax.nn`` in any case jax.nn computes exactly (``EXACT_WITH_JAX_NN``): above it blockwise is within
      5% of jax.nn or faster everywhere measured, at or below it auto delegates.
    * ``reference_max_seq``: for the options auto cannot delegate (``OWN_OPTIONS``), the longest sequence
      at which the materialized reference was faster than the blockwise kernel in most of the cases there.
    * ``decode_xla_max_kv_bytes``: the largest key cache (``batch * seq * heads * dim * itemsize`` bytes) at
      which a one-query ``decode`` step (forward) ran faster on ``jax.nn`` than on the blockwise kernel.
    * ``reference_max_kv``: the longest cache a one-query ``decode`` step (forward) ran faster on the
      reference than on the blockwise kernel (which skips the key blocks past the filled length).

    Decode steps count in forward mode only (inference); their forward+backward records are kept for reading.
    """

    def median(r, name):
        return r["results"].get(name, {}).get("median_s")

    def counted(r):  # a decode step is inference: its forward+backward (recorded) sets no threshold
        return r["option"] in EXACT_WITH_JAX_NN and not (r["option"] == "decode" and r["mode"] != "fwd")

    def slower_than_xla(r):  # a contender that failed (no median) counts as neither
        ours, theirs = median(r, "jattn:blockwise"), median(r, "jax.nn:xla")
        return ours is not None and theirs is not None and ours > 1.05 * theirs

    slower = [r["seq"] for r in records if counted(r) and slower_than_xla(r)]
    wins: dict[int, list[bool]] = {}
    for r in records:
        if r["option"] in OWN_OPTIONS and median(r, "jattn:reference") and median(r, "jattn:blockwise"):
            wins.setdefault(r["seq"], []).append(median(r, "jattn:reference") < median(r, "jattn:blockwise"))
    reference = [seq for seq, won in wins.items() if sum(won) > len(won) / 2]

    def faster_decode_steps(name):  # forward decode records where ``name`` beat the blockwise kernel
        mine = [r for r in records if r["option"] == "decode" and r["mode"] == "fwd"]
        timed = [r for r in mine if median(r, name) and median(r, "jattn:blockwise")]
        return [r for r in timed if median(r, name) < median(r, "jattn:blockwise")]

    decode = [r["seq"] for r in faster_decode_steps("jattn:reference")]
    dense_faster = [r["kv_bytes"] for r in faster_decode_steps("jax.nn:xla")]
    return {
        "decode_xla_max_kv_bytes": max(dense_faster, default=0),
        "xla_max_seq": max(slower, default=0),
        "reference_max_seq": max(reference, default=0),
        "reference_max_kv": max(decode, default=0),
    }


def kv_bytes(record: dict, shape: dict) -> int:
    """Bytes of a record's key cache: batch x seq x heads x dim x itemsize (the run's ``shape``)."""
    itemsize = jnp.dtype(record["dtype"]).itemsize
    return shape["batch"] * record["seq"] * shape["heads"] * shape["dim"] * itemsize


def _case(record: dict) -> tuple:
    return record["seq"], record["option"], record["mode"], record["dtype"]


def kept_records(earlier: dict, args) -> list[dict]:
    """The records of an ``earlier`` result (a device run cut short, say) that this run keeps: those of cases it
    does not measure, each marked with the command that measured it. The earlier run must have had this run's
    batch and rounds, backend and device kind, else its times are not comparable."""
    if earlier["shape"]["batch"] != args.batch or earlier["rounds"] != args.rounds:
        raise ValueError(
            f"--keep: the earlier run had batch {earlier['shape']['batch']} and {earlier['rounds']} rounds; "
            f"this one has {args.batch} and {args.rounds} (rerun with the same)"
        )
    here = machine_info()
    there = {key: earlier["machine"].get(key) for key in ("backend", "device_kind")}
    if there != {key: here[key] for key in there}:
        raise ValueError(f"--keep: the earlier run was on {there}, not { ({key: here[key] for key in there}) }")
    return [{"from": earlier["command"], **r} if "from" not in r else r for r in earlier["records"]]


def merged(kept: list[dict], records: list[dict]) -> list[dict]:
    """``kept`` records of the cases ``records`` lacks, then ``records``."""
    measured = {_case(r) for r in records}
    return [r for r in kept if _case(r) not in measured] + records


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.auto_rule", description=__doc__.split("\n")[0].strip("`: "))
    p.add_argument("--seq", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    p.add_argument("--option", nargs="+", choices=OPTIONS, default=list(OPTIONS))
    p.add_argument("--mode", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reference-max-seq", type=int, default=256, help="longest sequence the reference runs at")
    p.add_argument("--decode-seq", nargs="+", type=int, default=[256, 1024, 2048, 8192], help="decode cache lengths")
    p.add_argument("--out", type=Path, help="default: bench/results/auto-rule-<backend>.json")
    p.add_argument(
        "--contenders", nargs="+", default=list(CONTENDERS), help="e.g. jax.nn:xla jattn:auto (the default path)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--keep", type=Path, help="an earlier result: its cases this run does not measure are kept (marked)")
    args = p.parse_args(argv)
    shape = {"batch": args.batch, "heads": 8, "dim": 64, "reference_max_seq": args.reference_max_seq,
             "decode_seq": args.decode_seq}  # fmt: skip
    out = args.out or RESULTS_DIR / f"auto-rule-{jax.default_backend()}.json"
    command = "python -m bench.auto_rule " + " ".join(argv if argv is not None else __import__("sys").argv[1:])

    kept = kept_records(json.loads(args.keep.read_text()), args) if args.keep else []

    def save(records: list[dict]) -> dict:  # after every record: a run cut short keeps what it measured
        records = merged(kept, records)
        doc = {
            "machine": machine_info(),
            "command": command,
            "shape": shape,
            "rounds": args.rounds,
            "crossovers": crossovers(records) if "jattn:blockwise" in args.contenders else None,
            "records": records,
        }
        out.write_text(json.dumps(doc, indent=1) + "\n")
        return doc

    records = run(args.seq, args.option, args.mode, args.dtype, shape=shape, rounds=args.rounds,
                  progress=not args.no_progress, names=args.contenders, on_record=save)  # fmt: skip
    doc = save(records)
    print("crossovers:", doc["crossovers"], "->", out)
    return doc


if __name__ == "__main__":
    main()
