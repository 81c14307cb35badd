"""Every Python block in README.md runs as written (docs show the real call)."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


def test_readme_python_blocks_run_in_order():
    # The blocks build on each other, as a reader would paste them. README code
    # uses default dtypes, so run it with JAX's default promotion rules.
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for i, block in enumerate(BLOCKS):
            try:
                exec(compile(block, f"README.md block {i}", "exec"), namespace)
            except Exception as e:  # pragma: no cover - the message is the point
                pytest.fail(f"README.md python block {i} failed: {e!r}\n{block}")
