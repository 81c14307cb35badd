"""``python -m bench``: run the benchmark suites on whatever backend JAX finds.

Examples::

    python -m bench --quick                       # < 2 min on a 2-core CPU
    python -m bench                               # full preset (the README's)
    python -m bench --suite attention --seq 1024 4096 --dtype bfloat16 --impl 'jattn:*' 'jax.nn:*'
    python -m bench --list                        # suites and implementation labels
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench --suite parallel --seq 8192 32768
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import PRESETS, SUITE_NAMES, BenchConfig

RESULTS_DIR = Path(__file__).parent / "results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0].strip("`: "))
    p.add_argument("--quick", action="store_true", help="quick preset (default: full)")
    p.add_argument("--suite", nargs="+", choices=SUITE_NAMES, help="suites to run (matmul always runs)")
    p.add_argument("--seq", nargs="+", type=int, help="attention sequence lengths")
    p.add_argument("--kv-seq", type=int, help="key/value length (cross-attention); default: same as seq")
    p.add_argument("--kv-fill", type=int, help="real keys per example (key_value_seq_lengths); default: all")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention)")
    p.add_argument("--dim", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--mode", nargs="+", choices=("fwd", "fwd+bwd", "jvp", "hvp"))
    p.add_argument("--causal", choices=("both", "yes", "no"), help="causal, non-causal or both (default)")
    p.add_argument("--impl", nargs="+", help="implementation patterns, e.g. reference 'jax.nn:*' (see --list)")
    p.add_argument("--repeats", type=int, help="timed calls per case (>= 5 for reported figures)")
    p.add_argument("--warmup", type=int, help="untimed calls before them")
    p.add_argument("--module-seq", type=int, help="sequence length of the module suite")
    p.add_argument("--decode-max-length", type=int, help="KV-cache positions of the decode suite")
    p.add_argument("--decode-fill", nargs="+", type=int, help="cache fills of the decode suite")
    p.add_argument("--parallel-timed-seq", type=int, help="longest sequence the parallel suite times")
    p.add_argument("--name", help="results file stem (default: <date>-<backend>-<preset>)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list suites and implementation labels, then exit")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The preset, with every option that was given replacing its value."""
    cfg = PRESETS["quick" if args.quick else "full"]
    overrides = {
        "suites": args.suite,
        "seq_lengths": args.seq,
        "kv_seq": args.kv_seq,
        "kv_fill": args.kv_fill,
        "batch": args.batch,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "dim": args.dim,
        "dtype": args.dtype,
        "modes": args.mode,
        "causal": {"both": None, "yes": (True,), "no": (False,)}[args.causal] if args.causal else None,
        "impls": args.impl,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "module_seq": args.module_seq,
        "decode_max_length": args.decode_max_length,
        "decode_fills": args.decode_fill,
        "parallel_timed_seq": args.parallel_timed_seq,
    }
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, **given)


def list_cases(cfg: BenchConfig) -> str:
    from .runner import select_cases

    labels = dict.fromkeys((c.suite, c.impl, c.peer) for c in select_cases(cfg))
    return "\n".join(f"{suite:10} {impl}{' (peer)' if peer else ''}" for suite, impl, peer in labels)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.list:
        print(list_cases(cfg))
        return 0
    from . import plot, runner, table

    doc = runner.run_benchmarks(cfg, progress=not args.no_progress, argv=argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.name or f"{stamp}-{doc['meta']['backend']}-{cfg.preset}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table.summary(doc))
    print(f"\nresults: {json_path}")
    if not args.no_plot and (png := plot.plot_attention(doc, args.out_dir / f"{stem}.png")):
        print(f"plot:    {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
