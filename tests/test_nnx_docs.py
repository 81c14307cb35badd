"""jattn.nnx documentation: the README has nnx examples, public names have doctest examples."""

import re
from pathlib import Path

from jattn import nnx as jnnx


def test_readme_has_nnx_examples():
    # tests/test_docs.py runs every docs page's blocks; here: the NNX page's nnx section has its own.
    readme = (Path(__file__).parents[1] / "docs" / "flax.md").read_text()
    region = readme.split("<!-- nnx:start -->")[1].split("<!-- nnx:end -->")[0]
    assert len(re.findall(r"```python\n(.*?)```", region, re.S)) >= 3


def test_public_names_have_examples():
    assert sorted(jnnx.__all__) == ["AttentionBlock", "MultiHeadAttention", "PagedKV", "flax_attention_fn"]
    for name in jnnx.__all__:
        obj = getattr(jnnx, name)
        assert obj.__doc__ and ">>>" in obj.__doc__, name
