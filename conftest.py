"""Test-wide JAX settings: float64 available, no silent rank or dtype promotion.

The suite compiles hundreds of small programs, and on CPU most of its time is
LLVM optimizing them; at these shapes optimized code buys nothing. The backend
optimization level 0 (set before JAX starts its backend, so subprocess tests
inherit it) cuts compile time by about 40%. It changes no HLO pass, so the
compiled memory figures the tests assert are the same. A user's own XLA_FLAGS
win.
"""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
