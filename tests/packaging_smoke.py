"""A user's first minutes with an installed jattn; tests/test_packaging.py runs it in a fresh venv.

``python packaging_smoke.py core``: the wheel alone (no flax) imports and computes attention.
``python packaging_smoke.py nnx``: with the ``nnx`` extra, a ``jattn.nnx`` module runs forward.

It checks that jattn comes from the environment's site-packages (not a source checkout) and that
its installed metadata carries the package's version. Importing this file does nothing.
"""

import importlib.metadata
import importlib.util
import pathlib
import sys


def _check_installed() -> None:
    import jattn

    package = pathlib.Path(jattn.__file__).resolve().parent
    assert pathlib.Path(sys.prefix).resolve() in package.parents, f"jattn imported from {package}, not {sys.prefix}"
    assert importlib.metadata.version("jattn") == jattn.__version__, importlib.metadata.version("jattn")
    assert (package / "py.typed").is_file(), "py.typed missing from the wheel"
    licenses = importlib.metadata.distribution("jattn").files or []
    assert any(f.name == "LICENSE" for f in licenses), "LICENSE missing from the wheel's metadata"


def core() -> None:
    import jax
    import jax.numpy as jnp

    import jattn

    _check_installed()
    assert "flax" not in sys.modules, "import jattn imported flax"
    assert importlib.util.find_spec("flax") is None, "flax is installed: the core install must not pull it in"
    q = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))  # (batch, seq, heads, dim)
    kv = jax.random.normal(jax.random.key(1), (2, 16, 2, 8))  # grouped-query: 2 heads per kv head
    out = jattn.dot_product_attention(q, kv, kv, is_causal=True)
    expected = jax.nn.dot_product_attention(q, kv, kv, is_causal=True)
    assert out.shape == (2, 16, 4, 8), out.shape
    assert jnp.allclose(out, expected, atol=1e-5), float(jnp.abs(out - expected).max())
    assert "flax" not in sys.modules, "a jattn call imported flax"
    print(f"core ok: jattn {jattn.__version__}, jax {jax.__version__}")


def nnx() -> None:
    import jax
    from flax import nnx as fnnx

    from jattn import nnx as jnnx

    _check_installed()
    mha = jnnx.MultiHeadAttention(num_heads=2, in_features=8, head_dim=4, rngs=fnnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))  # (batch, seq, features)
    y = mha(x, is_causal=True)
    assert y.shape == (2, 5, 8), y.shape
    assert bool(jax.numpy.isfinite(y).all())
    print("nnx ok")


if __name__ == "__main__":
    {"core": core, "nnx": nnx}[sys.argv[1]]()
