"""The tutorial notebook's NumPy attention, kept as the ``seed`` suite's peer.

Written the way the notebook wrote it: plain ``np.exp`` softmax (no max
shift), one query against a few keys first, then scaled self-attention of a
batch with ``np.matmul``.
"""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """The notebook's softmax: ``exp(x) / sum(exp(x))`` along ``axis``."""
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def single_query_attention(query: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One query ``(dim,)`` against keys ``(kv_seq, dim)``: unscaled scores, softmax, weighted sum.

    Example:
        >>> q = np.array([0.41, 0.42, 0.43])
        >>> k = np.array([[0.11, 0.12, 0.13], [0.21, 0.22, 0.23]])
        >>> print(np.round(single_query_attention(q, k, k), 4))
        [0.1631 0.1731 0.1831]
    """
    scores = keys @ query
    weights = softmax(scores)
    return weights @ values


def self_attention(x: np.ndarray) -> np.ndarray:
    """Scaled self-attention of a batch ``(batch, seq, dim)``, x as queries, keys and values."""
    scores = np.matmul(x, x.transpose(0, 2, 1)) / np.sqrt(x.shape[-1])
    weights = softmax(scores, axis=-1)
    return np.matmul(weights, x)
