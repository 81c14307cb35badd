"""``attention``: every jattn implementation against ``jax.nn`` (and torch) over a sequence sweep.

Layout ``(batch, seq, heads, dim)``. Modes: ``fwd`` (the output),
``fwd+bwd`` (gradients of ``sum(output)`` with respect to q, k and v), ``jvp``
(``jax.jvp`` with tangents for q, k and v) and ``hvp`` (``jax.jvp`` of those
gradients: a Hessian-vector product, forward over reverse). The
jattn implementations are read from ``jattn.IMPLEMENTATIONS`` when the
cases are made, so a new one is benchmarked without touching this file.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..case import Case, JaxTarget, PythonTarget, Target, Unavailable
from ..config import BenchConfig
from ..flops import attention_flops
from ..inputs import normal


def implementation_labels(backend: str, *, torch_importable: bool) -> list[tuple[str, bool]]:
    """``(label, is_peer)`` for every implementation that belongs on this backend.

    All jattn implementations are listed on every backend (one that cannot run
    here is recorded with its error); ``jax.nn:cudnn`` only on GPU; torch only
    when it can be imported.
    """
    import jattn

    labels = [(f"jattn:{name}", False) for name in jattn.IMPLEMENTATIONS]
    labels.append(("jax.nn:xla", True))
    if backend == "gpu":
        labels.append(("jax.nn:cudnn", True))
    if torch_importable:
        labels.append(("torch:sdpa", True))
    return labels


def attention_fn(impl: str, *, causal: bool, kv_fill: int | None = None) -> Callable:
    """``f(q, k, v) -> out`` for a JAX implementation label (``jattn:*`` or ``jax.nn:*``).

    With ``kv_fill``, only the first ``kv_fill`` keys of every example are real
    (``key_value_seq_lengths``).
    """
    library, name = impl.split(":", 1)

    def lengths(q):
        return None if kv_fill is None else jnp.full(q.shape[:1], kv_fill, jnp.int32)

    if library == "jattn":
        import jattn

        def f(q, k, v):
            return jattn.dot_product_attention(
                q, k, v, is_causal=causal, key_value_seq_lengths=lengths(q), implementation=name
            )

        return f
    if library == "jax.nn":
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, key_value_seq_lengths=lengths(q), implementation=name
        )
    raise ValueError(f"not a JAX attention implementation: {impl!r}")


def forward_backward(f: Callable) -> Callable:
    """Gradients of ``sum(f(q, k, v, *rest))`` (summed in float32) with respect to q, k and v."""
    return jax.grad(lambda q, k, v, *rest: jnp.sum(f(q, k, v, *rest).astype(jnp.float32)), argnums=(0, 1, 2))


def forward_mode(f: Callable) -> Callable:
    """``jax.jvp`` of ``f(q, k, v)`` with the inputs as tangents."""
    return lambda q, k, v: jax.jvp(f, (q, k, v), (q, k, v))


def target_fn(f: Callable, mode: str) -> Callable:
    """What one timed call of ``mode`` runs."""
    match mode:
        case "fwd":
            return f
        case "fwd+bwd":
            return forward_backward(f)
        case "jvp":
            return forward_mode(f)
        case "hvp":
            return forward_mode(forward_backward(f))
    raise ValueError(f"unknown mode {mode!r}")


def make_inputs(params: dict, *, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normal q ``(batch, seq, heads, dim)`` and k, v ``(batch, kv_seq, kv_heads, dim)``."""
    b, t, s, h, kvh, d = (params[n] for n in ("batch", "seq", "kv_seq", "heads", "kv_heads", "dim"))
    q = normal((b, t, h, d), params["dtype"], seed=seed)
    k = normal((b, s, kvh, d), params["dtype"], seed=seed + 1)
    v = normal((b, s, kvh, d), params["dtype"], seed=seed + 2)
    return q, k, v


def torch_target(q, k, v, *, causal: bool, mode: str) -> PythonTarget:
    """``torch.nn.functional.scaled_dot_product_attention`` on the same inputs (optional peer)."""
    import torch

    use_cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = "cuda" if use_cuda else "cpu"
    dtype = getattr(torch, str(q.dtype))

    def to_torch(x):  # (batch, seq, heads, dim) -> (batch, heads, seq, dim)
        t = torch.from_numpy(np.array(x, np.float32)).to(
            device=device, dtype=dtype
        )  # a writable copy: torch warns on views
        return t.transpose(1, 2).contiguous().requires_grad_(mode == "fwd+bwd")

    tq, tk, tv = map(to_torch, (q, k, v))
    gqa = tq.shape[1] != tk.shape[1]
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)

    def call():
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=gqa)
        if mode == "fwd+bwd":
            for t in (tq, tk, tv):
                t.grad = None
            out.float().sum().backward()
        sync()

    if mode == "fwd":
        return PythonTarget(torch.inference_mode()(call), (), {"device": device})
    return PythonTarget(call, (), {"device": device})


def build(impl: str, params: dict) -> Target:
    """The target of one attention case."""
    q, k, v = make_inputs(params)
    if impl.startswith("torch:"):
        if params["mode"] not in ("fwd", "fwd+bwd"):
            raise Unavailable(f"torch has no {params['mode']} case here (forward-mode autodiff)")
        return torch_target(q, k, v, causal=params["causal"], mode=params["mode"])
    f = attention_fn(impl, causal=params["causal"], kv_fill=params.get("kv_fill"))
    return JaxTarget(target_fn(f, params["mode"]), (q, k, v))


def case_label(params: dict) -> str:
    """E.g. ``"fwd+bwd causal T=512"`` (``T=512 S=1024`` for cross-attention, ``fill=64`` for padded keys)."""
    lengths = f"T={params['seq']}" + (f" S={params['kv_seq']}" if params["kv_seq"] != params["seq"] else "")
    lengths += f" fill={params['kv_fill']}" if params.get("kv_fill") is not None else ""
    return f"{params['mode']} {'causal' if params['causal'] else 'full'} {lengths}"


def cases(cfg: BenchConfig) -> Iterator[Case]:
    """Every selected implementation, for every mode, causal flag and sequence length."""
    torch_importable = importlib.util.find_spec("torch") is not None
    labels = implementation_labels(jax.default_backend(), torch_importable=torch_importable)
    for mode in cfg.modes:
        for causal in cfg.causal:
            for seq in cfg.seq_lengths:
                params = {
                    "mode": mode,
                    "causal": causal,
                    "batch": cfg.batch,
                    "seq": seq,
                    "kv_seq": cfg.kv_seq or seq,
                    "kv_fill": cfg.kv_fill,
                    "heads": cfg.heads,
                    "kv_heads": cfg.kv_heads or cfg.heads,
                    "dim": cfg.dim,
                    "dtype": cfg.dtype,
                }
                flops = attention_flops(
                    batch=cfg.batch,
                    heads=cfg.heads,
                    kv_heads=params["kv_heads"],
                    q_seq=seq,
                    kv_seq=params["kv_seq"] if cfg.kv_fill is None else min(cfg.kv_fill, params["kv_seq"]),
                    dim=cfg.dim,
                    causal=causal,
                    mode=mode,
                    backward_factor=cfg.backward_factor,
                )
                for impl, peer in labels:
                    if cfg.wants(impl):
                        yield Case(
                            suite="attention",
                            impl=impl,
                            label=case_label(params),
                            params=params,
                            flops=flops,
                            build=lambda impl=impl, params=params: build(impl, params),
                            peer=peer,
                        )
