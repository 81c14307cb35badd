"""The causal diagonal by quadrants: a partial block whose top rows see none of its right half is visited as
the top rows against the left keys and the bottom rows against all keys (forward) and the left keys against
every row, the right keys against the bottom rows (backward). Outputs and gradients equal the reference for
every option that reaches that branch, and the branch is taken exactly where it applies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn._blockwise import _backward, _forward

B, T, H, KH, D = 2, 71, 4, 2, 8  # blocks of 32: a partial third block, GQA
BLOCKS = {"block_q": 32, "block_kv": 32}


def normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float64)


Q, K, V = normal((B, T, H, D), 0), normal((B, T, KH, D), 1), normal((B, T, KH, D), 2)
COTANGENT = normal((B, T, H, D), 3)
SLOPES = jnp.linspace(0.1, 1.0, H, dtype=jnp.float64)
OPTIONS = {
    "causal": {},
    "lengths": {"key_value_seq_lengths": jnp.array([40, 71]), "query_seq_lengths": jnp.array([71, 50])},
    "window": {"local_window_size": (20, 0)},
    "soft_cap_sinks": {"logits_soft_cap": 3.0, "sinks": jnp.linspace(-1.0, 1.0, H, dtype=jnp.float64)},
    "segments": {"query_segment_ids": jnp.array([[0] * 30 + [1] * 41] * 2)},
}


def loss(implementation, options, score_mod):
    def f(q, k, v, slopes):
        extra = {} if implementation == "reference" else dict(BLOCKS)
        if "query_segment_ids" in options:
            extra["key_value_segment_ids"] = options["query_segment_ids"]
        mod = jattn.score_mods.alibi(slopes) if score_mod else None
        out = jattn.dot_product_attention(q, k, v, is_causal=True, score_mod=mod, implementation=implementation,
                                          **options, **extra)  # fmt: skip
        return jnp.sum(out * COTANGENT)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("score_mod", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_split_diagonal_equals_the_reference(name, score_mod):
    ours = loss("blockwise", OPTIONS[name], score_mod)(Q, K, V, SLOPES)
    expected = loss("reference", OPTIONS[name], score_mod)(Q, K, V, SLOPES)
    np.testing.assert_allclose(ours[0], expected[0], rtol=1e-12)
    for got, want in zip(ours[1], expected[1], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-11)


def test_the_split_is_taken_only_where_it_applies(monkeypatch):
    traced = []
    for module, name in ((_forward, "visit_split"), (_backward, "split_pair_grads")):
        original = getattr(module, name)

        def spy(*args, original=original, name=name, **kwargs):
            traced.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    def traced_for(**options):
        traced.clear()
        jax.jit(jax.grad(lambda q: jnp.sum(jattn.dot_product_attention(q, K, V, implementation="blockwise",
                                                                        **options))))(Q)  # fmt: skip
        return sorted(set(traced))

    assert traced_for(is_causal=True, **BLOCKS) == ["split_pair_grads", "visit_split"]
    assert traced_for(is_causal=True, block_q=16, block_kv=16) == []  # too small to halve
    bias = jnp.zeros((1, 1, T, T), jnp.float64)
    assert traced_for(is_causal=True, bias=bias, **BLOCKS) == []  # bias blocks are not halved
    assert traced_for(is_causal=False, **BLOCKS) == []  # no partial block


def test_only_the_causal_diagonal_blocks_qualify():
    from jattn._blockwise._geometry import ExampleBlocks, Grid

    def qualifies(causal, offset, qb, kb):
        blocks = ExampleBlocks.__new__(ExampleBlocks)  # the predicate reads the interval masks only
        blocks.grid, blocks.causal, blocks.window, blocks.offset, blocks.kv_end = (
            Grid(128, 128, 32, 32),
            causal,
            None,
            offset,
            128,
        )
        return bool(blocks.top_half_skips_right_half(qb, kb))

    for qb in range(3):
        assert qualifies(True, 0, qb, qb) and not qualifies(True, 0, qb + 1, qb)  # the diagonal; below it: full
        # a decode-like offset of 16: block (qb, qb) is full, the partial one is (qb, qb + 1)
        assert qualifies(True, 16, qb, qb + 1) and not qualifies(True, 16, qb, qb)
        assert not qualifies(False, 0, qb, qb)
