"""``python bench/device_smoke.py``: every implementation on this machine's default backend against a float64
truth computed on the host, in a few seconds (the first part of ``bench/device_check.sh``).

For each implementation (``reference``, ``blockwise``, ``xla``, ``cudnn`` in bfloat16, and the auto rule),
option set and dtype it prints the relative error of the output and of the query gradient,
‖ours − truth‖ / ‖truth‖, at JAX's default matmul precision (and in float32 at ``"highest"``) (on a GPU the default
float32 product may run in TF32, about 1e-3). Failures are printed, not raised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jattn

OPTIONS = {
    "none": {},
    "causal+lengths": {"is_causal": True, "key_value_seq_lengths": np.array([5, 61, 97], np.int32)},
}


def truth(q, k, v, options) -> tuple[np.ndarray, np.ndarray]:
    """Output and dq in float64 on the host (jattn's reference over float64 CPU arrays)."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        opts = {key: jnp.asarray(val) if isinstance(val, np.ndarray) else val for key, val in options.items()}
        f = lambda q, k, v: jattn.dot_product_attention(q, k, v, **opts, implementation="reference")  # noqa: E731
        out = f(*args)
        dq = jax.grad(lambda q: jnp.sum(f(q, *args[1:]) ** 2))(args[0])
        return np.asarray(out), np.asarray(dq)


def relative(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check(args, options: dict, impl: str | None, precision: str, want: tuple[np.ndarray, np.ndarray]) -> str:
    """One implementation's errors against the truth, or the error it raised (one failure hides nothing)."""
    try:
        with jax.default_matmul_precision(precision):

            def f(q, k, v):
                return jattn.dot_product_attention(q, k, v, **options, implementation=impl)

            def out_and_dq(q, k, v):  # one program per check: a GPU compiles each in about a second
                return f(q, k, v), jax.grad(lambda q: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2))(q)

            out, dq = jax.jit(out_and_dq)(*args)
            return f"out {relative(out, want[0]):.1e} dq {relative(dq, want[1]):.1e}"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main() -> None:
    jax.config.update("jax_enable_x64", True)  # the float64 truth; every other array has its dtype given
    print("backend", jax.default_backend(), jax.devices()[0].device_kind)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((3, 97, 4, 64)).astype(np.float32) for _ in range(3))
    for name, options in OPTIONS.items():
        want = truth(q, k, v, options)
        opts = {key: jnp.asarray(val) if isinstance(val, np.ndarray) else val for key, val in options.items()}
        for impl in ("reference", "blockwise", "xla", "cudnn", None):
            for dtype in ("bfloat16",) if impl == "cudnn" else ("float32", "bfloat16"):
                args = [jnp.asarray(x, dtype) for x in (q, k, v)]
                for precision in ("default", "highest") if dtype == "float32" else ("default",):
                    text = check(args, opts, impl, precision, want)
                    print(f"{name:15} {impl!s:10} {dtype:9} {precision:8} {text}", flush=True)
    signature = jax.ShapeDtypeStruct((4, 4096, 8, 64), jnp.bfloat16)
    token = jax.ShapeDtypeStruct((4, 1, 8, 64), jnp.float32)
    cache = jax.ShapeDtypeStruct((4, 1024, 8, 64), jnp.float32)
    print("auto picks:", jattn.auto_implementation(signature, signature, signature, is_causal=True),
          jattn.auto_implementation(token, cache, cache, kv_cache=True))  # fmt: skip


if __name__ == "__main__":
    main()
