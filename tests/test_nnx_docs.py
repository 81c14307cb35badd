"""jattn.nnx documentation: the README's nnx examples run, public names have doctest examples."""

import re
from pathlib import Path

from jattn import nnx as jnnx


def test_readme_nnx_examples_run():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    region = readme.split("<!-- nnx:start -->")[1].split("<!-- nnx:end -->")[0]
    blocks = re.findall(r"```python\n(.*?)```", region, re.S)
    assert len(blocks) >= 3
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_public_names_have_examples():
    assert sorted(jnnx.__all__) == ["AttentionBlock", "MultiHeadAttention"]
    for name in jnnx.__all__:
        obj = getattr(jnnx, name)
        assert obj.__doc__ and ">>>" in obj.__doc__, name
