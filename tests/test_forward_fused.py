"""The fused forward-mode pass: ``jax.jvp`` in one sweep, taken apart again by reverse mode.

``jax.jvp`` through the blockwise kernel binds ``fused_p`` (output and tangent
together); every reverse-mode path must split it into the forward and the
tangent pass (``_blockwise/_partial_eval.py``). Outputs and derivatives are
checked against the reference implementation in float64, with small blocks
(4 x 3) so loops, skipped and partial blocks take part.
"""

from __future__ import annotations

import contextlib
import io

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import jattn
from jattn._blockwise._partial_eval import split_equation
from jattn._blockwise._primitive import fused_p, kernel_p

BLOCKS = {"block_q": 4, "block_kv": 3}
FUSED, KERNEL = fused_p.name, kernel_p.name


def inputs(seed=0):
    """Prime sizes, GQA (4 heads over 2), v_dim != dim, a bias, per-head sinks and ALiBi-like slopes."""
    rng = np.random.default_rng(seed)
    shapes = ((2, 11, 4, 3), (2, 13, 2, 3), (2, 13, 2, 5), (1, 4, 11, 13), (4,), (4,))
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float64) for s in shapes)


OPTIONS = {
    "causal_window_lengths": dict(is_causal=True, local_window_size=(4, 1), key_value_seq_lengths=jnp.array([9, 13])),
    "bias_mask_soft_cap": dict(
        use_bias=True, mask=jnp.asarray(np.random.default_rng(1).random((2, 1, 11, 13)) > 0.3), logits_soft_cap=2.0
    ),
    "sinks_score_mod_segments": dict(
        use_sinks=True,
        use_slopes=True,
        query_segment_ids=jnp.array([[0] * 6 + [1] * 5] * 2),
        key_value_segment_ids=jnp.array([[0] * 7 + [1] * 6] * 2),
    ),
}


def attention(implementation, options):
    """``f(q, k, v, bias, sinks, slopes)``: every differentiable operand an argument."""
    options = dict(options)
    use_bias, use_sinks, use_slopes = (options.pop(n, False) for n in ("use_bias", "use_sinks", "use_slopes"))
    extra = BLOCKS if implementation == "blockwise" else {}

    def f(q, k, v, bias, sinks, slopes):
        mods = {}
        if use_slopes:
            mods["score_mod"] = lambda s, b, h, i, j: s - slopes[h] * jnp.abs(i - j).astype(s.dtype)
        return jattn.dot_product_attention(
            q,
            k,
            v,
            bias if use_bias else None,
            sinks=sinks if use_sinks else None,
            implementation=implementation,
            **mods,
            **options,
            **extra,
        )

    return f


def primitives(fn, *args) -> set[str]:
    """Names of every primitive in ``fn``'s jaxpr, sub-jaxprs included."""
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def assert_trees_close(got, expected):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-11)


def test_jvp_is_one_fused_pass_and_reverse_mode_is_not():
    args = inputs()
    f = attention("blockwise", OPTIONS["causal_window_lengths"])
    jvp = primitives(lambda *a: jax.jvp(f, a, a), *args)
    assert FUSED in jvp and KERNEL not in jvp
    grad = primitives(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)), *args)
    assert KERNEL in grad and FUSED not in grad


@pytest.mark.parametrize("name", list(OPTIONS))
def test_fused_jvp_matches_reference(name):
    args = inputs()
    tangents = inputs(seed=5)

    def run(implementation):
        f = attention(implementation, OPTIONS[name])
        return jax.jit(lambda a, t: jax.jvp(f, a, t))(args, tangents)

    assert_trees_close(run("blockwise"), run("reference"))


def _scan_of(f):
    def g(q, *rest):
        return jax.lax.scan(lambda c, _: (f(c, *rest)[..., :3], None), q, None, length=2)[0]

    return g


def _loss(f):
    return lambda *a: jnp.sum(jnp.sin(f(*a)))


REVERSE = {
    "grad": lambda f, a: jax.grad(_loss(f), argnums=range(6))(*a),
    "checkpoint": lambda f, a: jax.grad(jax.checkpoint(_loss(f)), argnums=range(6))(*a),
    "checkpoint_everything_saveable": lambda f, a: jax.grad(
        jax.checkpoint(_loss(f), policy=jax.checkpoint_policies.everything_saveable), argnums=range(6)
    )(*a),
    "checkpoint_of_scan": lambda f, a: jax.grad(jax.checkpoint(_loss(_scan_of(f))), argnums=range(6))(*a),
    "cond": lambda f, a: jax.grad(lambda *b: jax.lax.cond(True, _loss(f), lambda *c: 0.0, *b), argnums=range(6))(*a),
    "vjp_jvp_tangent": lambda f, a: jax.vjp(lambda *b: jax.jvp(f, b, a)[1], *a)[1](f(*a)),
    "checkpoint_of_jvp": lambda f, a: jax.grad(
        jax.checkpoint(lambda *b: jnp.sum(jax.jvp(f, b, a)[1] ** 2)), argnums=range(6)
    )(*a),
    "jacfwd": lambda f, a: jax.jacfwd(lambda s: f(*a[:4], s, a[5])[0, 2])(a[4]),
    "vmap_of_jvp": lambda f, a: jax.vmap(lambda q: jax.jvp(lambda x: f(x, *a[1:]), (q,), (q,)))(a[0][None]),
}


@pytest.mark.parametrize("transform", list(REVERSE))
def test_every_transform_of_the_fused_pass_matches_reference(transform):
    args = inputs()
    options = OPTIONS["sinks_score_mod_segments"] if transform == "jacfwd" else OPTIONS["causal_window_lengths"]

    def run(implementation):
        return jax.jit(lambda *a: REVERSE[transform](attention(implementation, options), a))(*args)

    assert_trees_close(run("blockwise"), run("reference"))


@pytest.fixture
def without_direct_linearize():
    before = jax.config.jax_use_direct_linearize
    jax.config.update("jax_use_direct_linearize", False)
    yield
    jax.config.update("jax_use_direct_linearize", before)


def test_grad_splits_the_fused_pass_without_direct_linearize(without_direct_linearize):
    """JAX's older route to reverse mode: the JVP (fused), then partial evaluation of it."""
    args = inputs()
    options = OPTIONS["bias_mask_soft_cap"]
    grad = jax.grad(_loss(attention("blockwise", options)), argnums=range(6))
    assert FUSED not in primitives(grad, *args)
    assert_trees_close(grad(*args), jax.grad(_loss(attention("reference", options)), argnums=range(6))(*args))


def _saved(fn, *args) -> str:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_saved_residuals(fn, *args)
    return text.getvalue()


def test_checkpoint_saves_what_its_policy_says():
    q, k, v = inputs()[:3]

    def f(q, k, v):
        return jattn.dot_product_attention(q, k, v, implementation="blockwise", **BLOCKS)

    recomputed = _saved(jax.checkpoint(f), q, k, v)
    assert KERNEL not in recomputed and recomputed.count("from the argument") == 3, recomputed
    saved = _saved(jax.checkpoint(f, policy=jax.checkpoint_policies.everything_saveable), q, k, v)
    assert saved.count(f"output of {KERNEL}") == 2, saved  # the output and its log-sum-exp
    of_jvp = _saved(jax.checkpoint(lambda q, k, v: jax.jvp(f, (q, k, v), (q, k, v))[1]), q, k, v)
    assert KERNEL not in of_jvp and FUSED not in of_jvp, of_jvp


def _fused_equation():
    q, k, v = inputs()[:3]
    f = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="blockwise", **BLOCKS))
    jaxpr = jax.make_jaxpr(lambda *a: jax.jvp(f, a[:3], a[3:]))(q, k, v, q, k, v).jaxpr
    pending = [jaxpr]
    while pending:
        for eqn in pending.pop().eqns:
            if eqn.primitive is fused_p:
                return eqn
            pending.extend(jax.extend.core.jaxprs_in_params(eqn.params))
    raise AssertionError("no fused equation")


@pytest.mark.parametrize(
    ("unknown", "saved", "expected"),
    [
        ("everything", False, (None, FUSED, [True] * 4)),
        ("nothing", True, (FUSED, None, [False] * 4)),
        ("nothing", False, (FUSED, FUSED, [False] * 4)),
        ("tangents", True, (KERNEL, KERNEL, [False, False, True, True])),
        ("tangents", False, (KERNEL, FUSED, [False, False, True, True])),
    ],
)
def test_split_equation_for_every_policy_and_unknown_set(unknown, saved, expected):
    eqn = _fused_equation()
    m, n = len(eqn.invars), eqn.params["kernel"].num_ops
    unks_in = {"everything": [True] * m, "nothing": [False] * m, "tangents": [False] * n + [True] * (m - n)}[unknown]

    def policy(*_, **__):
        return saved

    known, staged, unks_out, inst_out, residuals = split_equation(policy, unks_in, [False] * m, eqn)
    names = (known and known.primitive.name, staged and staged.primitive.name)
    assert (*names, list(unks_out)) == expected
    if unknown == "tangents" and saved:  # the forward's results feed the tangent pass as residuals
        assert known.params["kernel"] == eqn.params["kernel"].forward_pass()
        assert staged.params["kernel"] == eqn.params["kernel"].tangent_pass()
        assert set(known.outvars) <= set(residuals) and list(staged.outvars) == list(eqn.outvars[2:])
    if unknown == "tangents" and not saved:  # only inputs are saved; the staged side recomputes
        assert not set(eqn.outvars) & set(residuals) and all(inst_out)
