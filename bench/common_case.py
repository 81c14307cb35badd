"""``python -m bench.common_case``: the common case against what jattn replaces, each row with its target.

What a JAX user mostly runs — short sequences, decode steps over a KV cache, causal masks, compile time —
measured against the call they would make otherwise, in interleaved rounds (A B A B ...: a noisy shared
machine slows both alike), each timed sample lasting at least ``--min-sample-ms`` (a sub-millisecond
call is otherwise mostly timer and dispatch jitter). Every row is a ratio, jattn over the peer of the same
run, and carries its target (``met`` when ratio <= target). With ``--repeats R`` each part runs R times in a
row and each row's ratio is the median of its R ratios (all R are kept in the row, ``ratios``; an even R
takes the higher middle one), at R times the run time: on a shared machine two compiles of one program read
0.92-1.05 of each other in one measurement, a spread that reaches the 1.05 target. Parts:

* ``auto``: ``jattn.dot_product_attention`` (auto rule) / ``jax.nn.dot_product_attention`` (xla), batch 4,
  8 heads, dim 64, T 128-1024, no options, causal, ``key_value_seq_lengths``, GQA (2 kv heads), a boolean
  mask; forward and forward+backward; float32 and bfloat16. Target 1.05.
* ``decode``: one-token step of ``jattn.nnx.MultiHeadAttention`` with its KV cache / the same step of
  ``flax.nnx.MultiHeadAttention(decode=True)`` (jitted, cache donated; ``bench.suites.decode``), batch 1
  and 8, 512 features, 8 heads, caches 256-8192 filled to 1, half and full-1. Target 1.0.
* ``causal``: the default path at T=4096 (batch 1, 8 heads, dim 64), causal / non-causal. Target 0.55.
* ``compile``: seconds to compile, jattn's default path / jax.nn's at T=512 (forward, forward+backward)
  and the NNX decode step / flax's at cache 1024 (median of ``--compile-rounds``). Target 2.0.
* ``jvp``: ``jax.jvp`` through the default path / its forward at T=4096 (target 3.0), and its XLA temp
  memory / ``jax.nn``'s jvp's (target 0.1).
* ``mask_mod``: 8 packed documents at T=8192, forward+backward: ``mask_mod`` without a prebuilt
  ``block_mask`` / the same mask passed as a dense array. Target 1.0.

The result (``bench/results/common-case-<backend>.json``) is committed; ``python -m bench.common_case_report``
draws its plot and tables, and ``python docs/regions.py`` puts them in the README and docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from . import auto_rule
from .inputs import normal
from .measure import temp_bytes
from .runner import machine_info

PARTS = ("auto", "decode", "causal", "compile", "jvp", "mask_mod")
TARGETS = {"auto": 1.05, "decode": 1.0, "causal": 0.55, "compile": 2.0, "jvp": 3.0, "jvp_memory": 0.1, "mask_mod": 1.0}


def row(part: str, case: str, ours: tuple[str, float], peer: tuple[str, float], **notes) -> dict[str, Any]:
    """One result: jattn's figure over the peer's, against the part's target."""
    ratio = ours[1] / peer[1]
    target = TARGETS[notes.pop("target_key", part)]
    return {"part": part, "case": case, "ours": ours[0], "ours_value": ours[1], "peer": peer[0],
            "peer_value": peer[1], "ratio": ratio, "target": target, "met": ratio <= target, **notes}  # fmt: skip


def combine(repeats: list[list[dict]]) -> list[dict]:
    """One row per case from the rows of several runs of a part: the row whose ratio is the median (the higher
    one for an even count: the verdict never rests on the better of two measurements), its figures that
    run's, with every run's ratio in ``ratios``, in run order. A case missing from later runs (a run cut
    short) keeps the runs that measured it; a case a run measures twice (a length given twice) stays two rows."""
    cases: dict[tuple, list[dict]] = {}
    for rows in repeats:
        seen: dict[tuple, int] = {}
        for r in rows:
            key = (r["part"], r["case"], r["ours"], r["peer"])
            seen[key] = seen.get(key, -1) + 1
            cases.setdefault((*key, seen[key]), []).append(r)
    out = []
    for runs in cases.values():
        order = sorted(range(len(runs)), key=lambda i: runs[i]["ratio"])
        chosen = runs[order[len(runs) // 2]]
        out.append({**chosen, "ratios": [r["ratio"] for r in runs]} if len(repeats) > 1 else chosen)
    return out


def blocking(f: Callable, *args) -> Callable[[], Any]:
    """A call of the compiled ``f(*args)`` that waits for its result."""
    return lambda: jax.block_until_ready(f(*args))


def part_auto(args) -> list[dict]:
    shape = {"batch": 4, "heads": 8, "dim": 64, "reference_max_seq": 0, "decode_seq": []}
    names = ("jax.nn:xla", "jattn:auto")
    records = auto_rule.run(args.seq, args.option, args.mode, args.dtype, shape=shape, rounds=args.rounds,
                            progress=False, names=names, min_sample_s=args.min_sample_s)  # fmt: skip
    rows = []
    for r in records:
        ours, theirs = r["results"]["jattn:auto"], r["results"]["jax.nn:xla"]
        case = f"{r['dtype']} {r['option']} {r['mode']} T={r['seq']}"
        same = ours["program"] == theirs["program"]  # then the ratio is this machine's noise
        rows.append(row("auto", case, ("jattn:auto", ours["median_s"]), ("jax.nn:xla", theirs["median_s"]),
                        same_program=same))  # fmt: skip
        report(rows[-1], args)
    return rows


def part_decode(args) -> list[dict]:
    from .suites import decode

    rows = []
    for batch in args.decode_batch:
        for max_length in args.cache:
            for fill in sorted({1, max_length // 2, max_length - 1}):
                params = {"batch": batch, "max_length": max_length, "fill": fill, "features": 512, "heads": 8,
                          "dtype": "float32"}  # fmt: skip
                theirs, ours = decode.build(decode.PEER, params), decode.build(decode.MINE, params)
                times = auto_rule.interleave({"flax": theirs.fn, "jattn": ours.fn}, rounds=args.rounds,
                                             min_sample_s=args.min_sample_s)  # fmt: skip
                case = f"batch {batch} cache {max_length} fill {fill}"
                notes = {"implementation": ours.notes.get("implementation")}
                rows.append(row("decode", case, (decode.MINE, times["jattn"]), (decode.PEER, times["flax"]), **notes))
                report(rows[-1], args)
    return rows


def _qkv(batch: int, seq: int, dtype: str = "float32") -> tuple[jax.Array, ...]:
    return tuple(normal((batch, seq, 8, 64), dtype, seed=i) for i in range(3))


def _grad(f: Callable) -> Callable:
    return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))


def part_causal(args) -> list[dict]:
    import jattn

    q, k, v = _qkv(1, args.long_seq)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        calls = {}
        for causal in (True, False):
            f = lambda q, k, v, causal=causal: jattn.dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
            calls[causal] = blocking(jax.jit(f if mode == "fwd" else _grad(f)), q, k, v)
        times = auto_rule.interleave(calls, rounds=args.long_rounds)
        case = f"{mode} T={args.long_seq}"
        rows.append(row("causal", case, ("jattn causal", times[True]), ("jattn non-causal", times[False])))
        report(rows[-1], args)
    return rows


def compile_seconds(lowerings: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of ``lower().compile()`` per contender, interleaved, with JAX's caches cleared."""
    times: dict[str, list[float]] = {name: [] for name in lowerings}
    for _ in range(rounds):
        for name, lower in lowerings.items():
            jax.clear_caches()
            lowered = lower()
            start = time.perf_counter()
            lowered.compile()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def part_compile(args) -> list[dict]:
    import jattn

    q, k, v = _qkv(4, args.compile_seq)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        fs = {"jattn:auto": jattn.dot_product_attention,
              "jax.nn:xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")}  # fmt: skip
        lowerings = {n: (lambda f=f: jax.jit(f if mode == "fwd" else _grad(f)).lower(q, k, v)) for n, f in fs.items()}
        s = compile_seconds(lowerings, args.compile_rounds)
        rows.append(
            row(
                "compile",
                f"{mode} T={args.compile_seq}",
                ("jattn:auto", s["jattn:auto"]),
                ("jax.nn:xla", s["jax.nn:xla"]),
            )
        )
        report(rows[-1], args)
    rows.append(decode_compile(args))
    report(rows[-1], args)
    return rows


def decode_compile(args) -> dict:
    from .suites import decode

    cache = args.compile_cache
    params = {"batch": 1, "max_length": cache, "fill": cache // 2, "features": 512, "heads": 8, "dtype": "float32"}
    seconds: dict[str, list[float]] = {decode.PEER: [], decode.MINE: []}
    for _ in range(args.compile_rounds):
        for impl in seconds:
            jax.clear_caches()
            seconds[impl].append(decode.build(impl, params).notes["compile_s"])
    ours, theirs = (statistics.median(seconds[i]) for i in (decode.MINE, decode.PEER))
    return row("compile", f"decode step, cache {cache}", (decode.MINE, ours), (decode.PEER, theirs))


def part_jvp(args) -> list[dict]:
    import jattn

    q, k, v = _qkv(1, args.long_seq)

    def jvp_of(f):
        return jax.jit(lambda q, k, v: jax.jvp(f, (q, k, v), (q, k, v)))

    ours = jvp_of(jattn.dot_product_attention)
    times = auto_rule.interleave({"jvp": blocking(ours, q, k, v),
                                  "fwd": blocking(jax.jit(jattn.dot_product_attention), q, k, v)},
                                 rounds=args.long_rounds)  # fmt: skip
    case = f"T={args.long_seq}"
    rows = [row("jvp", f"time {case}", ("jvp", times["jvp"]), ("forward", times["fwd"]))]
    xla = jvp_of(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    memory = [temp_bytes(f.lower(q, k, v).compile()) for f in (ours, xla)]
    if None not in memory:
        rows.append(row("jvp", f"temp memory {case}", ("jattn jvp", memory[0]), ("jax.nn:xla jvp", memory[1]),
                        target_key="jvp_memory", unit="bytes"))  # fmt: skip
    for r in rows:
        report(r, args)
    return rows


def part_mask_mod(args) -> list[dict]:
    import jattn
    from jattn import masks

    seq, docs = args.doc_seq, 8
    q, k, v = _qkv(1, seq)
    ids = jnp.repeat(jnp.arange(docs, dtype=jnp.int32), seq // docs)[None]
    dense = (ids[:, :, None] == ids[:, None, :])[:, None]  # arguments, not constants XLA would fold

    def with_mod(q, k, v, ids):
        return jattn.dot_product_attention(q, k, v, mask_mod=masks.document(ids))

    def with_dense(q, k, v, dense):
        return jattn.dot_product_attention(q, k, v, mask=dense)

    fs = {"mod": (with_mod, ids), "dense": (with_dense, dense)}
    grads = {
        n: jax.jit(jax.grad(lambda q, k, v, x, f=f: jnp.sum(f(q, k, v, x)), argnums=(0, 1, 2)))
        for n, (f, _) in fs.items()
    }
    compile_s = {}
    for name, g in grads.items():
        start = time.perf_counter()
        grads[name] = g.lower(q, k, v, fs[name][1]).compile()
        compile_s[name] = round(time.perf_counter() - start, 2)
    times = auto_rule.interleave({n: blocking(g, q, k, v, fs[n][1]) for n, g in grads.items()}, rounds=args.long_rounds)
    r = row("mask_mod", f"fwd+bwd {docs} documents T={seq}", ("mask_mod", times["mod"]), ("dense mask", times["dense"]),
            compile_s=compile_s)  # fmt: skip
    report(r, args)
    return [r]


def report(r: dict, args: argparse.Namespace | None = None, label: str = "") -> None:
    """Prints a row (``label``: a note after its target), and hands it to ``args.on_row`` where ``main`` set one
    (it saves the run so far)."""
    mark = "ok " if r["met"] else "MISS"
    label = f", {label}" if label else ""
    print(f"{mark} {r['part']:8} {r['case']:40} {r['ratio']:6.2f} (target {r['target']}{label})", flush=True)
    if args is not None and getattr(args, "on_row", None) is not None:
        args.on_row(r)


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.common_case", description=__doc__.split("\n")[0].strip("`: "))
    p.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seq", nargs="+", type=int, default=[128, 256, 512, 1024], help="the auto part's lengths")
    p.add_argument(
        "--option", nargs="+", choices=auto_rule.OPTIONS, default=["none", "causal", "lengths", "gqa", "mask"]
    )
    p.add_argument("--mode", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    p.add_argument("--decode-batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--cache", nargs="+", type=int, default=[256, 1024, 2048, 8192], help="decode cache lengths")
    p.add_argument("--long-seq", type=int, default=4096, help="the causal and jvp parts' length")
    p.add_argument("--doc-seq", type=int, default=8192, help="the mask_mod part's length")
    p.add_argument("--rounds", type=int, default=21, help="interleaved rounds of the short cases")
    p.add_argument("--long-rounds", type=int, default=9, help="interleaved rounds at --long-seq and --doc-seq")
    p.add_argument("--compile-rounds", type=int, default=3)
    p.add_argument("--compile-seq", type=int, default=512, help="the compile part's attention length")
    p.add_argument("--compile-cache", type=int, default=1024, help="the compile part's decode cache")
    p.add_argument("--min-sample-ms", type=float, default=20.0, help="each timed sample lasts at least this")
    p.add_argument("--repeats", type=int, default=1, help="runs of each part; a row's ratio is their median")
    p.add_argument("--out", type=Path, help="default: bench/results/common-case-<backend>.json")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    args.min_sample_s = args.min_sample_ms / 1000
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    rows: list[dict] = []
    out = args.out or auto_rule.RESULTS_DIR / f"common-case-{jax.default_backend()}.json"

    def save(partial: list[dict]) -> dict:  # after every row: a run cut short keeps what it measured
        doc = {"machine": machine_info(), "command": " ".join(["python -m bench.common_case", *argv]),
               "repeats": args.repeats, "rows": rows + partial}  # fmt: skip
        out.write_text(json.dumps(doc, indent=1) + "\n")
        return doc

    for part in args.part:
        runs: list[list[dict]] = []  # this part's runs so far, the last one in progress
        for i in range(args.repeats):
            if args.repeats > 1:
                print(f"-- {part}: run {i + 1} of {args.repeats}", flush=True)
            runs.append([])

            def on_row(r: dict, runs: list[list[dict]] = runs) -> None:
                runs[-1].append(r)
                save(combine(runs))

            args.on_row = on_row
            runs[-1] = globals()[f"part_{part}"](args)
        combined = combine(runs)
        rows += combined
        if args.repeats > 1:
            for r in combined:
                report(r, label=f"median of {args.repeats}")
    doc = save([])
    met = sum(r["met"] for r in rows)
    print(f"{met}/{len(rows)} rows meet their target -> {out}")
    return doc


if __name__ == "__main__":
    main()
