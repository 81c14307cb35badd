"""Tables and plot of a ``python -m bench.common_case`` result.

    python -m bench.common_case_report bench/results/common-case-cpu.json   # writes common-case-cpu.png

``docs/regions.py`` puts :func:`summary_markdown` in the README and :func:`full_markdown` in
docs/performance.md, so no figure is typed by hand.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .table import fmt_bytes, fmt_time

WHAT = {
    "auto": "`jattn.dot_product_attention` (auto) / `jax.nn.dot_product_attention` (xla), T 128-1024",
    "decode": "one-token decode step, `jattn.nnx` / `flax.nnx` `MultiHeadAttention`",
    "causal": "causal / non-causal time, default path",
    "compile": "compile time, jattn / the peer",
    "jvp": "`jax.jvp` / forward time; jvp temp memory / jax.nn's",
    "mask_mod": "`mask_mod` without `block_mask` / the same dense mask",
}


def _parts(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["part"] for r in rows))


def _value(r: dict, key: str) -> str:
    return fmt_bytes(r[key]) if r.get("unit") == "bytes" else fmt_time(r[key])


def summary_markdown(doc: dict[str, Any]) -> str:
    """One line per part: rows meeting the target, the worst ratio and its case."""
    rows = doc["rows"]
    lines = ["| part | what is compared | target | rows met (missed on the peer's own program) | worst ratio (case) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for part in _parts(rows):
        mine = [r for r in rows if r["part"] == part]
        worst = max(mine, key=lambda r: r["ratio"] / r["target"])
        targets = "; ".join(f"<= {t:g}" for t in dict.fromkeys(r["target"] for r in mine))
        met = sum(r["met"] for r in mine)
        same = sum(not r["met"] and bool(r.get("same_program")) for r in mine)
        lines.append(f"| {part} | {WHAT.get(part, part)} | {targets} | {met}/{len(mine)} ({same}) | "
                     f"{worst['ratio']:.2f} ({worst['case']}) |")  # fmt: skip
    return "\n".join(lines)


def _ratio(r: dict) -> str:
    """The row's ratio; with repeats (``--repeats``), the median and, in brackets, the lowest and highest."""
    spread = r.get("ratios", [])
    return f"{r['ratio']:.2f}" if len(spread) < 2 else f"{r['ratio']:.2f} ({min(spread):.2f}-{max(spread):.2f})"


def full_markdown(doc: dict[str, Any]) -> str:
    """Every row: both figures, the ratio (with ``--repeats``, the median and its range) and whether it meets its
    target ("same program": jattn compiled to the peer's own program, so the ratio measures the machine's
    noise)."""
    lines = ["| part | case | jattn | peer | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        ours, peer = f"{_value(r, 'ours_value')} ({r['ours']})", f"{_value(r, 'peer_value')} ({r['peer']})"
        case = f"{r['case']} (same program)" if r.get("same_program") else r["case"]
        lines.append(f"| {r['part']} | {case} | {ours} | {peer} | {_ratio(r)} | {r['target']:g} | "
                     f"{'yes' if r['met'] else '**no**'} |")  # fmt: skip
    return "\n".join(lines)


def run_line(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v and k in ("jax", "flax"))
    device = "" if m["backend"] == "cpu" else f" ({m['device_kind']})"
    repeats = doc.get("repeats", 1)
    runs = {len(r.get("ratios", [r["ratio"]])) for r in doc["rows"]} or {repeats}
    upto = "" if runs == {repeats} else "up to "  # a run cut short: some rows have fewer
    how = "every ratio from one run" if repeats == 1 else f"every ratio the median of {upto}{repeats} runs of its part"
    return (f"Made by `{doc['command']}` on backend `{m['backend']}`{device}, {m['cpu_count']} CPUs ({versions}); "
            f"interleaved rounds, medians, {how}.")  # fmt: skip


def auto_rule_markdown(doc: dict[str, Any]) -> str:
    """A ``python -m bench.auto_rule`` result as a table: jax.nn's XLA time, each other contender's time over
    it, and what the auto rule picks for that case on the run's backend (``jattn.auto_implementation``)."""
    timed = (n for r in doc["records"] for n, res in r["results"].items() if "vs_jax_nn" in res)
    names = [n for n in dict.fromkeys(timed) if n != "jax.nn:xla"]  # a contender that never ran has no column
    lines = [f"| case | jax.nn:xla | {' | '.join(f'{n} / xla' for n in names)} | auto picks |",
             "|---|---|" + "---|" * len(names) + "---|"]  # fmt: skip
    origins = kept_origins(doc)
    for r in doc["records"]:
        res = r["results"]
        ratios = [f"{res[n]['vs_jax_nn']:.2f}" if "vs_jax_nn" in res.get(n, {}) else "-" for n in names]
        case = f"{r['dtype']} {r['option']} {r['mode']} T={r['seq']}"
        case += f" (kept {origins.index(r['from']) + 1})" if "from" in r else ""
        picked = auto_pick(r, doc["shape"], doc["machine"]["backend"])
        lines.append(f"| {case} | {fmt_time(res['jax.nn:xla'].get('median_s'))} | {' | '.join(ratios)} | {picked} |")
    return "\n".join(lines)


def kept_origins(doc: dict[str, Any]) -> list[str]:
    """The commands of the earlier runs whose records a ``--keep`` run kept, in order: a table row marked
    "(kept i)" comes from the i-th."""
    return list(dict.fromkeys(r["from"] for r in doc["records"] if "from" in r))


def auto_pick(record: dict, shape: dict, backend: str) -> str:
    """``jattn.auto_implementation`` for one ``bench.auto_rule`` record's shapes and option on ``backend``."""
    import jax
    import jax.numpy as jnp

    import jattn

    batch, heads, dim, seq, dtype = shape["batch"], shape["heads"], shape["dim"], record["seq"], record["dtype"]
    option = record["option"]
    struct = jax.ShapeDtypeStruct
    kv = struct((batch, seq, 2 if option == "gqa" else heads, dim), dtype)
    q = struct((batch, 1 if option == "decode" else seq, heads, dim), dtype)
    lengths = struct((batch,), jnp.int32)
    options = {"causal": {"is_causal": True}, "lengths": {"key_value_seq_lengths": lengths},
               "decode": {"key_value_seq_lengths": lengths}, "bias": {"bias": struct((batch, heads, seq, seq), dtype)},
               "soft_cap": {"logits_soft_cap": 30.0}, "mask": {"mask": struct((batch, 1, 1, seq), jnp.bool_)},
               "segments": {"query_segment_ids": struct((batch, seq), jnp.int32),
                            "key_value_segment_ids": struct((batch, seq), jnp.int32)}}.get(option, {})  # fmt: skip
    return jattn.auto_implementation(q, kv, kv, **options, backend=backend)


def plot(doc: dict[str, Any], path: str | Path) -> Path:
    """A PNG: per part, each row's ratio as a point on a log scale (a bar from parity to it), the part's target
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = doc["rows"]
    parts = _parts(rows)
    heights = [max(1.5, 0.16 * sum(r["part"] == p for r in rows) + 0.6) for p in parts]
    fig, axes = plt.subplots(len(parts), 1, figsize=(9, sum(heights)), height_ratios=heights, squeeze=False)
    for ax, part in zip(axes[:, 0], parts, strict=True):
        mine = [r for r in rows if r["part"] == part]
        ratios = [r["ratio"] for r in mine]
        colors = ["tab:green" if r["met"] else "tab:red" for r in mine]
        ax.hlines(range(len(mine)), 1.0, ratios, color=colors, linewidth=2)  # from parity to the ratio
        ax.scatter(ratios, range(len(mine)), color=colors, s=12, zorder=3)
        ax.set_yticks(range(len(mine)), [r["case"] for r in mine], fontsize=6)
        ax.invert_yaxis()
        for target in dict.fromkeys(r["target"] for r in mine):
            ax.axvline(target, color="black", linestyle="--", linewidth=1)
        ax.axvline(1.0, color="grey", linewidth=0.5)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_title(f"{part}: {WHAT.get(part, part)}".replace("`", ""), fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("ratio (jattn / peer; dashed: target, green: met)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.common_case_report", description="Plot a common-case result.")
    p.add_argument("results", type=Path)
    args = p.parse_args(argv)
    doc = json.loads(args.results.read_text())
    print(plot(doc, args.results.with_suffix(".png")))
    print(summary_markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
