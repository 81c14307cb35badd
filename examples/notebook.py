"""The tutorial notebook, done with jattn: run with `make demo`.

1. Single-query attention, unscaled, keys used as values: scores, weights, context.
2. Scaled self-attention over a batch, jitted and vmapped.
3. A heatmap of the attention weights, saved as PNG.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jattn

jax.config.update("jax_enable_x64", True)  # the notebook's numbers are float64
np.set_printoptions(precision=8, suppress=True)
OUT = Path(__file__).parent / "out"


def single_query() -> None:
    print("== 1. One query over two keys (unscaled dot product; keys are also the values)")
    query = jnp.array([0.41, 0.42, 0.43])
    keys = jnp.array([[0.11, 0.12, 0.13], [0.21, 0.22, 0.23]])
    scores = jattn.scores(query, keys, scale=1.0)
    weights = jattn.softmax(scores)
    context = jattn.context(weights, keys)
    print("scores :", np.asarray(scores))
    print("weights:", np.asarray(weights))
    print("context:", np.asarray(context))


def batched_self_attention() -> jax.Array:
    print("\n== 2. Scaled self-attention (q = k = v, scale 1/sqrt(3)), jitted and vmapped over the batch")
    x = jnp.array([[[0.11, 0.12, 0.13], [0.21, 0.22, 0.23], [0.31, 0.32, 0.33]]])
    self_attention = jax.jit(jax.vmap(lambda x: jattn.attention(x, x, x, return_weights=True)))
    context, weights = self_attention(x)
    print("scores (example 0):\n", np.asarray(jattn.scores(x[0], x[0])))
    print("weights (example 0):\n", np.asarray(weights[0]))
    print("context (batch, seq, dim):\n", np.asarray(context))
    same = jattn.dot_product_attention(x[:, :, None, :], x[:, :, None, :], x[:, :, None, :])[:, :, 0]
    print("dot_product_attention (batch, seq, heads=1, dim) agrees:", bool(jnp.allclose(same, context, atol=1e-12)))
    return weights[0]


def heatmap(weights: jax.Array) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(exist_ok=True)
    path = OUT / "attention_weights.png"
    fig, ax = plt.subplots(figsize=(4, 3.5))
    image = ax.imshow(np.asarray(weights), cmap="viridis")
    for (i, j), w in np.ndenumerate(np.asarray(weights)):
        ax.text(j, i, f"{w:.3f}", ha="center", va="center", color="white", fontsize=8)
    ticks = range(weights.shape[0])
    ax.set(xticks=ticks, yticks=ticks, xlabel="key position", ylabel="query position", title="Self-attention weights")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    single_query()
    weights = batched_self_attention()
    print(f"\n== 3. Heatmap of the weights saved to {heatmap(weights)}")
