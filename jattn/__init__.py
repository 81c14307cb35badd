"""jattn: attention for JAX as pure functions.

The functional core works on one example (``scores``, ``softmax``,
``context``, ``attention``); ``dot_product_attention`` is the batched,
multi-head drop-in for ``jax.nn.dot_product_attention`` (``IMPLEMENTATIONS``
lists its kernels, ``auto_implementation`` says which one a call gets);
``jattn.score_mods`` holds ``score_mod`` functions (ALiBi, T5 buckets, ...); ``jattn.masks`` holds
mask predicates; ``jattn.paged`` attends many sequences over a paged KV cache (serving);
``jattn.sharding`` runs attention sequence-parallel over devices; ``jattn.testing`` checks the
gradients of attention variants.
Flax NNX modules live in ``jattn.nnx`` (importing ``jattn`` does not import
flax).
"""

from . import masks as masks
from . import paged as paged
from . import score_mods as score_mods
from . import sharding as sharding
from . import testing as testing
from ._api import auto_implementation as auto_implementation
from ._api import dot_product_attention as dot_product_attention
from ._core import attention as attention
from ._core import context as context
from ._core import scores as scores
from ._core import softmax as softmax
from ._dispatch import IMPLEMENTATIONS as IMPLEMENTATIONS
from ._tiling import DEFAULT_BLOCK_SIZES as DEFAULT_BLOCK_SIZES

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "IMPLEMENTATIONS",
    "attention",
    "auto_implementation",
    "context",
    "dot_product_attention",
    "masks",
    "paged",
    "score_mods",
    "scores",
    "sharding",
    "softmax",
    "testing",
]
