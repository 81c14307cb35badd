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
from jattn._blockwise import _backward, _blockmath, _forward

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


def hides_for(q_seq: int, **options) -> bool:
    """Whether the blockwise forward and backward (blocks of 32) select out unseen keys anywhere."""
    calls = []
    original = _blockmath.hide_unseen

    def spy(*args):
        calls.append(1)
        return original(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_blockmath, "hide_unseen", spy)
        options = {**BLOCKS, **options}
        f = lambda q, k, v: jnp.sum(jattn.dot_product_attention(q, k, v, implementation="blockwise", **options))  # noqa: E731
        jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(Q[:, :q_seq], K[:, :q_seq], V[:, :q_seq])
    return bool(calls)


def test_a_plain_causal_square_grid_of_whole_blocks_hides_no_key():
    # Its partial blocks are the diagonal ones, where the last row sees every key: hiding would be a no-op.
    assert not hides_for(64, is_causal=True)
    assert not hides_for(64, is_causal=True, score_mod=jattn.score_mods.alibi(SLOPES))  # a mod hides nothing
    # Anything that may hide a key from every row of a piece keeps the select.
    assert hides_for(71, is_causal=True)  # a padded last block
    assert hides_for(64, is_causal=True, key_value_seq_lengths=jnp.array([40, 64]))
    assert hides_for(64, is_causal=True, query_seq_lengths=jnp.array([64, 20]))
    assert hides_for(64, is_causal=True, local_window_size=(20, 0))
    ids = jnp.array([[0] * 30 + [1] * 34] * 2)
    assert hides_for(64, is_causal=True, query_segment_ids=ids, key_value_segment_ids=ids)
    assert hides_for(64, is_causal=True, mask=jnp.ones((1, 1, 64, 64), bool))
    assert hides_for(64, is_causal=True, block_q=32, block_kv=16)


@pytest.mark.parametrize("score_mod", [False, True], ids=["plain", "alibi"])
def test_whole_blocks_without_hiding_equal_the_reference(score_mod):
    q, k, v, cotangent = Q[:, :64], K[:, :64], V[:, :64], COTANGENT[:, :64]

    def loss(implementation):
        def f(q, k, v, slopes):
            mod = jattn.score_mods.alibi(slopes) if score_mod else None
            extra = {} if implementation == "reference" else BLOCKS
            out = jattn.dot_product_attention(q, k, v, is_causal=True, score_mod=mod, implementation=implementation,
                                              **extra)  # fmt: skip
            return jnp.sum(out * cotangent)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(q, k, v, SLOPES)

    ours, expected = loss("blockwise"), loss("reference")
    np.testing.assert_allclose(ours[0], expected[0], rtol=1e-12)
    for got, want in zip(ours[1], expected[1], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-11)
