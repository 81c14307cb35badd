"""The attention plot: time, memory and ratio to the peer against sequence length."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _variants(records: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
    return list(dict.fromkeys((r["params"]["mode"], r["params"]["causal"]) for r in records))


def _series(records, impl, mode, causal, value) -> tuple[list[int], list[float]]:
    points = sorted(
        (r["params"]["seq"], value(r))
        for r in records
        if r["impl"] == impl and r["params"]["mode"] == mode and r["params"]["causal"] == causal
    )
    points = [(s, v) for s, v in points if v is not None and v > 0]
    return [s for s, _ in points], [v for _, v in points]


def plot_attention(doc: dict[str, Any], path: str | Path) -> Path | None:
    """Writes a PNG: one column per (mode, causal), rows time / temp memory / ratio to the first peer.

    Time and memory are log-log, one line per implementation; the ratio panel
    is each jattn implementation's median over its first peer's (below 1 is
    faster). Returns the path, or None when there are no attention results.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    # label minor log ticks at 2 and 5 only, so that narrow ranges still get numbers
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else "")

    records = [r for r in doc["results"] if r["suite"] == "attention" and r["status"] == "ok"]
    if not records:
        return None
    impls = list(dict.fromkeys(r["impl"] for r in records))
    peers = {r["impl"] for r in records if r["peer"]}
    variants = _variants(records)
    fig, axes = plt.subplots(3, len(variants), figsize=(4.5 * len(variants), 10), squeeze=False, sharex=True)
    rows = (
        ("median time (ms)", lambda r: r["median_s"] * 1e3, "log"),
        ("XLA temp memory (MiB)", lambda r: None if r["temp_bytes"] is None else r["temp_bytes"] / 2**20, "log"),
        ("time / first peer's time", lambda r: next(iter(r["ratios"].values()), None), "linear"),
    )
    for col, (mode, causal) in enumerate(variants):
        for row, (ylabel, value, yscale) in enumerate(rows):
            ax = axes[row][col]
            for impl in impls:
                if row == 2 and impl in peers:
                    continue
                xs, ys = _series(records, impl, mode, causal, value)
                if xs:
                    ax.plot(xs, ys, marker="o", linestyle="--" if impl in peers else "-", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale(yscale)
            ax.xaxis.set_major_formatter(plain)
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
            if row == 2:
                ax.axhline(1.0, color="grey", linewidth=0.8)
                ax.set_xlabel("sequence length")
            if row == 0:
                ax.set_title(f"{mode}, {'causal' if causal else 'full'}")
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6) or 1)
    meta = doc["meta"]
    fig.suptitle(
        f"attention, {doc['config']['dtype']}, batch {doc['config']['batch']}, heads {doc['config']['heads']}, "
        f"dim {doc['config']['dim']} — {meta['backend']} ({meta['device_kind']}), {doc['config']['preset']} preset"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
