"""Blockwise attention: O(N)-memory online softmax with its own backward pass.

FlashAttention-2 structure in pure JAX, so it runs unchanged on CPU, GPU and
TPU. Nothing of size ``(q_seq, kv_seq)`` is built or saved (only a dense mask
or bias the caller passed, sliced per block; and dbias, which has bias's
shape). The package, in the order a call goes through it:

* ``_geometry``: the block grid and which (query block, key block) pairs to
  visit: invisible pairs are never visited, fully visible ones skip mask
  arithmetic, partial ones are masked in-kernel;
* ``_layout``: the kernel's operands (head-major queries, padding, batch
  folding) and the loop over examples;
* ``_blockmath``: block logits and matmuls shared by every pass;
* ``_forward``, ``_tangent`` (forward mode) and ``_backward``: the three passes;
* ``_dense``: the same passes on one block spanning everything (for second
  derivatives in reverse mode);
* ``_ring_layout`` (where a device's pieces sit), ``_pairs`` (one chunk pair's
  operands and merge) and ``_ring`` (the passes over a sequence split across
  devices: ring attention);
* ``_fused`` (forward mode's output and tangent in one sweep) and
  ``_partial_eval`` (how reverse mode splits that sweep into the forward and
  the tangent pass);
* ``_primitive`` (the primitives and their JAX rules), ``_passes`` (passes as
  primitive parameters, the generic higher-order pass) and ``_autodiff`` (the
  forward, fused, tangent and cotangent passes and the kernel's entry point).
"""

from __future__ import annotations

import dataclasses

from jaxtyping import Array

from .._options import AttentionInputs
from ..masks._block_mask import block_mask_of
from ._autodiff import kernel_attention
from ._blockmath import KernelSpec
from ._geometry import Grid, fitted_block
from ._layout import Operands, can_fold_batch, fold_batch, from_kernel_layout, to_kernel_layout, unfold_batch
from ._pairs import visited_blocks
from ._ring_layout import Ring, chunk_start, splits_for

__all__ = [  # what the rest of jattn may import from this package (nothing imports its modules)
    "Ring",
    "blockwise_attention",
    "chunk_start",
    "ring_attention",
    "splits_for",
    "visited_blocks",
]


def blockwise_attention(inputs: AttentionInputs, *, block_q: int, block_kv: int) -> tuple[Array, Array]:
    """Blockwise attention on normalized 4-D inputs (see ``reference_attention``).

    Returns ``(batch, q_seq, heads, v_dim)`` output and ``(batch, q_seq, heads)``
    log-sum-exp in the softmax compute dtype, both differentiable in every mode.
    """
    q_seq, kv_seq, batch = inputs.query.shape[1], inputs.key.shape[1], inputs.query.shape[0]
    # Concrete lengths: the capability table keeps symbolic ones away (_capabilities.SYMBOLIC).
    opts = inputs.opts
    if opts.block_mask is not None:  # the grid the block mask was built for
        grid = opts.block_mask.grid
    else:
        grid = Grid(q_seq, kv_seq, fitted_block(q_seq, block_q), fitted_block(kv_seq, block_kv))
        if opts.static.mask_mod is not None:  # no summary given: build one for this call (O(N^2) evaluations)
            consts = tuple(c[0] for c in opts.shared.mask_consts)
            heads = inputs.query.shape[2]
            summary = block_mask_of(opts.static.mask_mod, consts, batch, heads, grid, q_offset=opts.arrays.q_offset)
            inputs = inputs._replace(opts=dataclasses.replace(opts, block_mask=summary))
    spec = KernelSpec(inputs.opts.static, grid)
    ops = to_kernel_layout(inputs, grid)
    if can_fold_batch(ops):
        out, lse = kernel_attention(spec, fold_batch(ops))
        out, lse = unfold_batch(out, batch), unfold_batch(lse, batch)
    else:
        out, lse = kernel_attention(spec, ops)
    return from_kernel_layout(out, lse, grid)


def ring_attention(inputs: AttentionInputs, ring: Ring, *, block_q: int, block_kv: int) -> tuple[Array, Array]:
    """Inside a ``shard_map``: one device's shards of a sequence-parallel call (see ``_ring``).

    ``inputs`` are the device's shards in the normalized 4-D layout (a dense
    bias or mask holds the local query rows and every key column); returns the
    local ``(out, lse)``, differentiable in every mode.
    """
    q_chunk, kv_chunk = inputs.query.shape[1] // ring.parts, inputs.key.shape[1] // ring.parts
    grid = Grid(q_chunk, kv_chunk, fitted_block(q_chunk, block_q), fitted_block(kv_chunk, block_kv))
    spec = KernelSpec(inputs.opts.static, grid, ring)
    return kernel_attention(spec, Operands(*inputs))
