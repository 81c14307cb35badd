"""A float64 NumPy attention oracle, written independently of jattn.

Plain loops over batch and heads: build the visibility mask from every mask
option, softmax over the visible keys only (a row with none gives zeros and a
log-sum-exp of -inf), weighted sum of values. Gradients are the textbook
backward pass of the same steps and tangents the textbook forward-mode
derivative, so they share no code with JAX autodiff.

Layout as ``jax.nn.dot_product_attention``, always batched here::

    q (B, T, N, D)   k (B, S, K, D)   v (B, S, K, Dv)   bias/mask broadcastable to (B, N, T, S)
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class OracleResult:
    out: np.ndarray  # (B, T, N, Dv)
    lse: np.ndarray  # (B, T, N); -inf where no key is visible
    visible_rows: np.ndarray  # (B, T, N) bool: the row sees at least one key
    grads: dict[str, np.ndarray] | None  # "query", "key", "value", "bias" for the given cotangent
    tangent: np.ndarray | None = None  # (B, T, N, Dv): the output's tangent for the given tangents
    lse_tangent: np.ndarray | None = None  # (B, T, N)


def visibility(
    batch: int,
    heads: int,
    q_seq: int,
    kv_seq: int,
    *,
    mask=None,
    is_causal=False,
    local_window_size=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    query_segment_ids=None,
    key_value_segment_ids=None,
) -> np.ndarray:
    """Boolean (B, N, T, S): True where query t of head n may attend to key s."""
    i = np.arange(q_seq)[:, None]
    j = np.arange(kv_seq)[None, :]
    vis = np.ones((batch, heads, q_seq, kv_seq), bool)
    if mask is not None:
        vis &= np.broadcast_to(np.asarray(mask, bool), vis.shape)
    if is_causal:
        vis &= (j <= i)[None, None]
    if local_window_size is not None:
        left, right = (
            (local_window_size, local_window_size) if isinstance(local_window_size, int) else local_window_size
        )
        vis &= ((j >= i - left) & (j <= i + right))[None, None]
    for b in range(batch):
        if query_seq_lengths is not None:
            vis[b, :, np.asarray(query_seq_lengths)[b] :, :] = False
        if key_value_seq_lengths is not None:
            vis[b, :, :, np.asarray(key_value_seq_lengths)[b] :] = False
        if query_segment_ids is not None:
            same = np.asarray(query_segment_ids)[b][:, None] == np.asarray(key_value_segment_ids)[b][None, :]
            vis[b] &= same[None]
    return vis


def attention(
    q,
    k,
    v,
    bias=None,
    mask=None,
    *,
    scale=None,
    logits_soft_cap=None,
    cotangent=None,
    tangents=None,
    **mask_options,
) -> OracleResult:
    """Attention, and its vector-Jacobian product for ``cotangent`` (shaped like the output) and its
    Jacobian-vector product for ``tangents`` (a dict like ``grads``: query, key, value, optional bias)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_seq, heads, dim = q.shape
    _, kv_seq, kv_heads, v_dim = v.shape
    groups = heads // kv_heads
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    full = (batch, heads, q_seq, kv_seq)
    bias_full = np.zeros(full) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), full)
    vis = visibility(batch, heads, q_seq, kv_seq, mask=mask, **mask_options)

    out = np.zeros((batch, q_seq, heads, v_dim))
    lse = np.full((batch, q_seq, heads), -np.inf)
    want_grads = cotangent is not None
    if want_grads:
        cot = np.asarray(cotangent, np.float64)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        dbias = np.zeros(full)
    if tangents is not None:
        tq, tk, tv = (np.asarray(tangents[name], np.float64) for name in ("query", "key", "value"))
        tbias = tangents.get("bias")
        tbias = np.zeros(full) if tbias is None else np.broadcast_to(np.asarray(tbias, np.float64), full)
        tangent_out, lse_tangent = np.zeros_like(out), np.zeros_like(lse)
    for b in range(batch):
        for n in range(heads):
            kn = n // groups  # query head n reads kv head n // groups (heads grouped contiguously)
            raw = scale * q[b, :, n] @ k[b, :, kn].T
            capped = raw if logits_soft_cap is None else logits_soft_cap * np.tanh(raw / logits_soft_cap)
            logits = capped + bias_full[b, n]
            seen = vis[b, n]
            rows = seen.any(axis=1)
            peak = np.where(seen, logits, -np.inf).max(axis=1, initial=-np.inf)
            peak = np.where(rows, peak, 0.0)
            e = np.exp(np.where(seen, logits - peak[:, None], -np.inf))  # exp(-inf) = 0: masked
            total = e.sum(axis=1)
            p = e / np.where(rows, total, 1.0)[:, None]
            out[b, :, n] = p @ v[b, :, kn]
            lse[b, rows, n] = peak[rows] + np.log(total[rows])
            if tangents is not None:  # d(logits), then d(softmax) = p (dlogits - <p, dlogits>)
                draw = scale * (tq[b, :, n] @ k[b, :, kn].T + q[b, :, n] @ tk[b, :, kn].T)
                dcap = draw if logits_soft_cap is None else draw * (1 - np.tanh(raw / logits_soft_cap) ** 2)
                dlogits = dcap + tbias[b, n]
                mean = (p * dlogits).sum(axis=1, keepdims=True)
                tangent_out[b, :, n] = (p * (dlogits - mean)) @ v[b, :, kn] + p @ tv[b, :, kn]
                lse_tangent[b, :, n] = mean[:, 0]
            if want_grads:
                do = cot[b, :, n]
                dv[b, :, kn] += p.T @ do
                dp = do @ v[b, :, kn].T
                dlogits = p * (dp - (dp * p).sum(axis=1, keepdims=True))
                dbias[b, n] = dlogits
                draw = dlogits if logits_soft_cap is None else dlogits * (1 - np.tanh(raw / logits_soft_cap) ** 2)
                dq[b, :, n] = scale * draw @ k[b, :, kn]
                dk[b, :, kn] += scale * draw.T @ q[b, :, n]
    grads = None
    if want_grads:
        grads = {"query": dq, "key": dk, "value": dv}
        if bias is not None:
            grads["bias"] = _sum_to_shape(dbias, np.shape(bias))
    result = OracleResult(out, lse, vis.any(axis=3).transpose(0, 2, 1), grads)
    if tangents is not None:
        result.tangent, result.lse_tangent = tangent_out, lse_tangent
    return result


def _sum_to_shape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reverses broadcasting: sums the axes where ``shape`` has extent 1."""
    axes = tuple(a for a, (s, t) in enumerate(zip(shape, x.shape, strict=True)) if s == 1 and t != 1)
    return x.sum(axis=axes, keepdims=True)
