"""Attention masks as predicates on positions, and their block summaries.

A mask is a *predicate on positions*: ``mask_mod(q_idx, kv_idx) -> bool``,
True where query ``q_idx`` may attend to key ``kv_idx``, or FlexAttention's
``mask_mod(batch, head, q_idx, kv_idx) -> bool`` for masks that depend on the
example or head (:func:`document`, :func:`prefix_lm` with per-example
prefixes). Predicates are evaluated elementwise, so the same object serves a
dense ``(q_seq, kv_seq)`` mask (:func:`materialize`), the ``mask_mod=`` of
``jattn.dot_product_attention``, and a kernel that evaluates one block at a
time: :func:`block_mask` summarizes a predicate per block once, and the
blockwise kernel visits only the blocks that hold a visible position.

Axis legend: ``q_seq`` query positions, ``kv_seq`` key/value positions.

Example:
    >>> from jattn import masks
    >>> mod = masks.and_masks(masks.causal(), masks.sliding_window(1, 0))
    >>> print(masks.materialize(mod, 4, 4).astype(int))
    [[1 0 0 0]
     [1 1 0 0]
     [0 1 1 0]
     [0 0 1 1]]
"""

from ._block_mask import BlockMask as BlockMask
from ._block_mask import block_mask as block_mask
from ._combine import And as And
from ._combine import Document as Document
from ._combine import MaskMod as MaskMod
from ._combine import Or as Or
from ._combine import PrefixLM as PrefixLM
from ._combine import and_masks as and_masks
from ._combine import document as document
from ._combine import materialize as materialize
from ._combine import or_masks as or_masks
from ._combine import prefix_lm as prefix_lm
from ._positions import Causal as Causal
from ._positions import Chunked as Chunked
from ._positions import Dense as Dense
from ._positions import Dilated as Dilated
from ._positions import Lengths as Lengths
from ._positions import Segments as Segments
from ._positions import SlidingWindow as SlidingWindow
from ._positions import causal as causal
from ._positions import chunked as chunked
from ._positions import dense as dense
from ._positions import dilated as dilated
from ._positions import lengths as lengths
from ._positions import segments as segments
from ._positions import sliding_window as sliding_window
