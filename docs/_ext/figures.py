"""The documentation's pictures, drawn from jattn itself (public names only) at build time.

``make docs`` draws them into ``docs/_generated/`` (see ``jattn_docs.py``); to look at them alone::

    python docs/_ext/figures.py /tmp/figures

- ``masks.png``: causal, sliding-window and document masks, every position (``jattn.masks.materialize``)
  over the block summary the blockwise kernel works from (``jattn.masks.block_mask(...).kinds``).
- ``ring.png``: the ring schedule of sequence parallelism, which K/V shard each device holds at each
  step and how much of it its queries see (causal), contiguous against zigzag.
- ``work.png``: the work per device, contiguous against zigzag (``jattn.sharding.visited_blocks_per_device``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.patches import Patch, Rectangle

import jattn
from jattn import masks

SKIP, FULL, PARTIAL = 0, 1, 2  # the values of BlockMask.kinds (see jattn.masks.BlockMask)
KIND_COLORS = {SKIP: "#ffffff", FULL: "#9ecae1", PARTIAL: "#fdd0a2"}
KIND_NAMES = {SKIP: "skipped: never visited", FULL: "full: no mask arithmetic", PARTIAL: "partial: masked in-kernel"}
VISIBLE = "#08306b"
DPI = 110


def _mask_panel(ax, title: str, mod, seq: int, block: int) -> None:
    """One mask: its visible positions (dark squares) over its block kinds (cell colours)."""
    dense = np.asarray(masks.materialize(mod, seq, seq))
    kinds = np.asarray(masks.block_mask(mod, 1, 1, seq, seq, block_q=block, block_kv=block).kinds[0])
    for (qb, kb), kind in np.ndenumerate(kinds):
        ax.add_patch(Rectangle((kb * block, qb * block), block, block, color=KIND_COLORS[int(kind)], zorder=0))
    inset = 0.12  # a margin round each visible position, so its block's colour shows through
    cells = [
        Rectangle((k + inset, q + inset), 1 - 2 * inset, 1 - 2 * inset) for q, k in zip(*np.nonzero(dense), strict=True)
    ]
    ax.add_collection(PatchCollection(cells, facecolor=VISIBLE, edgecolor="none", zorder=1))
    for edge in range(0, seq + 1, block):
        ax.axhline(edge, color="#636363", lw=1.2, zorder=2)
        ax.axvline(edge, color="#636363", lw=1.2, zorder=2)
    visited = int((kinds != SKIP).sum())
    ax.set_title(f"{title}\nvisits {visited} of {kinds.size} blocks", fontsize=10)
    ax.set_xlim(0, seq)
    ax.set_ylim(seq, 0)
    ax.set_xticks(range(0, seq + 1, block))
    ax.set_yticks(range(0, seq + 1, block))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key position (kv_idx)", fontsize=8)


def draw_masks(path: Path, *, seq: int = 32, block: int = 8) -> Path:
    ids = jnp.repeat(jnp.arange(3), jnp.array([12, 14, 6]), total_repeat_length=seq)[None]  # 3 packed documents
    panels = [
        ("causal()", masks.causal()),
        ("causal() & sliding_window(6, 0)", masks.and_masks(masks.causal(), masks.sliding_window(6, 0))),
        ("causal() & document(ids)", masks.and_masks(masks.causal(), masks.document(ids))),
        ("chunked(16)", masks.chunked(16)),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.0), layout="constrained")
    for ax, (title, mod) in zip(axes, panels, strict=True):
        _mask_panel(ax, title, mod, seq, block)
    axes[0].set_ylabel("query position (q_idx)", fontsize=8)
    legend = [Patch(color=VISIBLE, label="visible position")]
    legend += [Patch(facecolor=KIND_COLORS[k], edgecolor="#636363", label=KIND_NAMES[k]) for k in (FULL, PARTIAL, SKIP)]
    fig.legend(handles=legend, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def ring_schedule(num_shards: int, layout: str, block: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(holds, work)``, each ``(device, step)``: the K/V shard a device holds at a ring step, and the
    visible fraction of that (query shard, K/V shard) pair under a causal mask.

    Device ``i`` passes its K/V shard to device ``i + 1`` after every step, so at step ``t`` it holds
    shard ``i - t`` (mod P). A shard is one chunk (contiguous) or two (zigzag: chunks ``i`` and
    ``2P - 1 - i``); each chunk is one block of the causal block summary.
    """
    chunks = 2 if layout == "zigzag" else 1
    n = num_shards * chunks
    kinds = np.asarray(
        masks.block_mask(masks.causal(), 1, 1, n * block, n * block, block_q=block, block_kv=block).kinds[0]
    )
    weight = np.select([kinds == FULL, kinds == PARTIAL], [1.0, 0.5], 0.0)  # a diagonal block: about half visible
    if layout == "zigzag":
        shard_chunks = [[i, 2 * num_shards - 1 - i] for i in range(num_shards)]
    else:
        shard_chunks = [[i] for i in range(num_shards)]
    holds = np.array([[(i - t) % num_shards for t in range(num_shards)] for i in range(num_shards)])
    work = np.array(
        [[weight[np.ix_(shard_chunks[i], shard_chunks[j])].mean() for j in row] for i, row in enumerate(holds)]
    )
    return holds, work


def _ring_panel(ax, layout: str, num_shards: int) -> None:
    holds, work = ring_schedule(num_shards, layout)
    ax.imshow(work, cmap="Blues", vmin=0, vmax=1.5, aspect="equal")
    for (i, t), j in np.ndenumerate(holds):
        seen = {0.0: "skipped", 0.5: "half seen", 1.0: "all seen"}.get(float(work[i, t]), f"{work[i, t]:.2f} seen")
        label = f"K/V {j}\n{seen}"
        ax.text(t, i, label, ha="center", va="center", fontsize=7, color="black" if work[i, t] < 0.9 else "white")
    ax.set_xticks(range(num_shards), [f"step {t}" for t in range(num_shards)], fontsize=7)
    ax.set_yticks(range(num_shards), [f"device {i}" for i in range(num_shards)], fontsize=7)
    per_device = work.sum(axis=1)
    ax.set_title(
        f"{layout}: causal work per device {' '.join(f'{w:g}' for w in per_device)}\n"
        f"(slowest / mean = {per_device.max() / per_device.mean():.2f})",
        fontsize=9,
    )


def draw_ring(path: Path, *, num_shards: int = 4) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.6), layout="constrained")
    _ring_panel(axes[0], "contiguous", num_shards)
    _ring_panel(axes[1], "zigzag", num_shards)
    fig.suptitle(
        f"Ring attention on {num_shards} devices: after each step, device i passes its K/V shard to device i + 1"
    )
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_work(path: Path, *, devices: int = 8, block: int = 64) -> Path:
    seq = 2 * devices * block
    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    x = np.arange(devices)
    for offset, layout in ((-0.2, "contiguous"), (0.2, "zigzag")):
        work = jattn.sharding.visited_blocks_per_device(
            seq, seq, devices, is_causal=True, layout=layout, block_q=block, block_kv=block
        )
        ax.bar(x + offset, work, width=0.4, label=f"{layout}: slowest / mean = {work.max() / work.mean():.2f}")
    ax.set_xticks(x, [str(i) for i in x], fontsize=8)
    ax.set_xlabel("device", fontsize=9)
    ax.set_ylabel("visited block pairs", fontsize=9)
    ax.set_title(f"visited_blocks_per_device: causal, P = {devices}, N = {seq}, blocks of {block}", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [draw_masks(out / "masks.png"), draw_ring(out / "ring.png"), draw_work(out / "work.png")]


if __name__ == "__main__":
    for p in draw_all(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_generated")):
        print(p)
