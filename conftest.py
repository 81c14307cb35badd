"""Test-wide JAX settings: float64 available, no silent rank or dtype promotion.

The suite compiles hundreds of small programs, and on CPU most of its time is
LLVM optimizing them; at these shapes optimized code buys nothing. The backend
optimization level 0 (set before JAX starts its backend, so subprocess tests
inherit it) cuts compile time by about 40%. It changes no HLO pass, so the
compiled memory figures the tests assert are the same. XLA:CPU's older
elemental emitters (``--xla_cpu_use_fusion_emitters=false``) generate the code
in about a third of the time of its MLIR fusion emitters (the blockwise order-2
``check_grads``: 30 s -> 10 s of backend compile); fusion differs in details,
the temp-memory figures of the memory tests do not. jaxlib 0.11 has no such
flag (XLA aborts on a flag it does not know), so it is set below 0.11 only. A user's own XLA_FLAGS win.

Tests also compile many identical programs (the same case through several
checks), so each pytest-xdist worker keeps JAX's persistent compilation cache:
a fresh directory per run *and per worker*, in the system's temp folder. It was
once shared by a run's workers, and JAX writes an entry in place (not
atomically): a worker that read an entry another was still writing got a
truncated file, JAX warned (zlib "incomplete or truncated stream") and
``filterwarnings = error`` failed the test. A worker only ever reads what it
wrote itself, so no entry is read while being written.

On a GPU, JAX's default float32 product may run in TF32: on an H200 every
implementation, jax.nn's own included, came out about 4e-4 (relative) from a
float64 truth at the default precision and 3e-7 at ``"highest"``
(``bench/device_smoke.py``). The suite checks jattn's arithmetic at float32
tolerances, so off the CPU it asks for full float32 products; on the CPU they
always are, and nothing changes there.
"""

import os
import tempfile

import jaxlib.version  # the version only: the backend has not started yet
import pytest

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if tuple(int(part) for part in jaxlib.version.__version__.split(".")[:2]) < (0, 11):
    # jaxlib 0.11 removed this flag, and XLA aborts the process on a flag it does not know
    _FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())  # the same in every worker of a run
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")  # gw0, gw1, ... : one cache each
if os.environ.get("JATTN_TEST_COMPILATION_CACHE", "1") != "0":  # =0: no persistent cache (to time the suite without)
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), f"jattn-tests-{_RUN}-{_WORKER}"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True, scope="session")
def _full_float32_products():
    """Full float32 products where the backend's default is reduced (see above). A fixture, not an import-time
    setting: it runs in the test workers only, so pytest-xdist's controller never starts a GPU backend."""
    if jax.default_backend() != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")
    yield
