"""The suite's own settings (conftest.py) that keep it from flaking."""

import os

import jax
import pytest


@pytest.mark.skipif(os.environ.get("JATTN_TEST_COMPILATION_CACHE") == "0", reason="persistent cache turned off")
def test_each_worker_has_its_own_compilation_cache():
    """JAX writes a persistent-cache entry in place: a worker reading an entry another worker was still writing
    got a truncated file and a zlib warning, which ``filterwarnings = error`` turned into a failure. With one
    directory per worker (and per run) no entry is ever read while it is being written."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or ""
    directory = os.path.basename(jax.config.jax_compilation_cache_dir)
    assert directory.endswith(f"-{worker}") and run in directory, directory


def test_float32_products_are_full_on_every_backend():
    """A GPU's default float32 product may be TF32 (about 4e-4 from the truth on an H200), which the suite's
    float32 tolerances would read as jattn's error: off the CPU conftest asks for ``"highest"``; on the CPU
    products are always full and the setting is left as JAX has it."""
    want = None if jax.default_backend() == "cpu" else "highest"
    assert jax.config.jax_default_matmul_precision == want
