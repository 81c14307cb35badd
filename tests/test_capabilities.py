"""The capability table is the one owner of "can this implementation run this call?"."""

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

import jattn
from jattn import _capabilities, _dispatch
from jattn._capabilities import CAPABILITIES, FEATURES, Support
from jattn._options import CallOptions, option_names
from jattn._prepare import prepare

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_table_is_the_generated_one():
    text = README.read_text()
    found = re.search(r"<!-- capabilities:start -->\n(.*?)\n<!-- capabilities:end -->", text, re.S)
    assert found, "README lost its capability table markers"
    assert found.group(1) == _capabilities.markdown_table(), (
        "regenerate: python -c 'from jattn._capabilities import rewrite_readme; rewrite_readme()'"
    )


def test_every_call_option_is_a_column():
    columns = set(_capabilities.OPTIONS)
    for name in option_names(internal=True):
        group = next(f for f in CallOptions.__dataclass_fields__.values() if f.name == name).metadata.get("group")
        assert (group or name) in columns, name


def test_option_names_split_static_from_arrays():
    static, arrays = set(option_names(static=True)), set(option_names(static=False))
    assert not static & arrays
    assert static | arrays == set(option_names())
    assert "query_offset" not in arrays and "query_offset" in option_names(static=False, internal=True)


def test_table_rows_name_known_implementations_and_features():
    assert set(CAPABILITIES) == {*jattn.IMPLEMENTATIONS, "sequence_parallel"}
    for row in CAPABILITIES.values():
        assert set(row) <= set(FEATURES)


_Q = jax.ShapeDtypeStruct((2, 5, 4, 8), jnp.float32)
_V3 = jax.ShapeDtypeStruct((2, 5, 4, 3), jnp.float32)
_IDS = jax.ShapeDtypeStruct((2, 5), jnp.int32)
_LEN = jax.ShapeDtypeStruct((2,), jnp.int32)

# One call per feature the table has (the properties and each option).
_CALLS = {
    "bias": dict(bias=jax.ShapeDtypeStruct((2, 4, 5, 5), jnp.float32)),
    "mask": dict(mask=jax.ShapeDtypeStruct((2, 4, 5, 5), jnp.bool_)),
    "query_seq_lengths": dict(query_seq_lengths=_LEN),
    "key_value_seq_lengths": dict(key_value_seq_lengths=_LEN),
    "query_segment_ids/key_value_segment_ids": dict(query_segment_ids=_IDS, key_value_segment_ids=_IDS),
    "sinks": dict(sinks=jax.ShapeDtypeStruct((4,), jnp.float32)),
    "is_causal": dict(is_causal=True),
    "local_window_size": dict(local_window_size=(2, 0)),
    "logits_soft_cap": dict(logits_soft_cap=5.0),
    "score_mod": dict(score_mod=lambda s, b, h, i, j: s),
    "mask_mod": dict(mask_mod=lambda b, h, i, j: i >= j),
    _capabilities.V_DIM: dict(value=_V3),
    _capabilities.ONE_SIDED_WINDOW_ONLY: dict(local_window_size=(1, 1)),
    _capabilities.FLOAT64: dict(dtype=jnp.float64),
    _capabilities.WIDE_FLOATS: dict(dtype=jnp.float32),
}


def _features(feature):
    """The features of a call that uses ``feature`` (x64 is on in the suite, see conftest), in bfloat16 unless
    the feature is a dtype: the one dtype every implementation takes, cuDNN's included."""
    kwargs = dict(_CALLS[feature])
    value = kwargs.pop("value", _Q)
    dtype = kwargs.pop("dtype", jnp.bfloat16)
    floats = lambda a: a.update(dtype=dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    arrays = {k: floats(v) for k, v in kwargs.items() if isinstance(v, jax.ShapeDtypeStruct)}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    seen = []

    def trace(q, v, arrays):
        seen.append(_capabilities.features_of(prepare(q, q, v, CallOptions(**arrays, **static)).inputs))

    jax.eval_shape(trace, _Q.update(dtype=dtype), value.update(dtype=dtype), arrays)
    return seen[0]


@pytest.mark.parametrize("feature", list(_CALLS))
def test_a_call_using_a_feature_reports_it(feature):
    assert feature in _features(feature)


@pytest.mark.parametrize("feature", list(_CALLS))
@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto_only_picks_implementations_that_honour_the_call_exactly(feature, backend):
    signature = _dispatch.CallSignature(
        backend, jnp.dtype(jnp.bfloat16), 5, 5, 8, 8, frozenset(_features(feature))
    )  # bf16 head dim 8: cuDNN-eligible on GPU, so only the table can keep it out
    chosen = _dispatch.choose(signature)
    assert _capabilities.support(chosen, feature) in (Support.YES, Support.REPAIRED, Support.EMULATED)


@pytest.mark.parametrize("feature", list(_CALLS))
def test_a_decode_step_over_a_large_cache_goes_blockwise_only_where_that_is_exact(feature):
    step = _dispatch.CallSignature("cpu", jnp.dtype(jnp.float32), 1, 1024, 8, 8, frozenset(_features(feature)))
    chosen = _dispatch.choose(step._replace(kv_bytes=2**24))
    assert _capabilities.support(chosen, feature) in (Support.YES, Support.REPAIRED, Support.EMULATED)


def test_the_decode_rule_reads_the_cache_size():
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    for batch, expected in ((1, "xla"), (8, "blockwise")):  # keys of 2 MiB, then 16 MiB (DECODE_XLA_MAX_KV_BYTES)
        step = jax.ShapeDtypeStruct((batch, 1, 8, 64), jnp.float32)
        cache = jax.ShapeDtypeStruct((batch, 1024, 8, 64), jnp.float32)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
        got = jattn.auto_implementation(step, cache, cache, key_value_seq_lengths=lengths, backend="cpu")
        assert got == expected
        prefill = jax.ShapeDtypeStruct((batch, 2, 8, 64), jnp.float32)  # two queries: not a one-query step
        assert jattn.auto_implementation(prefill, cache, cache, key_value_seq_lengths=lengths, backend="cpu") == "xla"


@pytest.mark.parametrize("implementation", list(jattn.IMPLEMENTATIONS))
@pytest.mark.parametrize("feature", [f for f in _CALLS if f in _capabilities.OPTIONS or f == _capabilities.V_DIM])
def test_an_explicit_implementation_refuses_exactly_the_options_its_row_says_no_to(implementation, feature):
    features = _features(feature)
    if _capabilities.support(implementation, feature) in (Support.NO, Support.EMULATED):
        with pytest.raises(ValueError, match=rf"implementation='{implementation}' .*does not support"):
            _capabilities.check_supported(implementation, features)
    else:
        assert feature not in _capabilities.lacking(implementation, features)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_cudnn_refuses_wide_floats_before_jax_nn_sees_them(dtype):
    """jax.nn's cuDNN kernel raises a NotImplementedError from deep inside for float32 (seen on an H200); jattn
    names the dtype and the implementations that take it, on any backend."""
    x = jnp.zeros((1, 3, 2, 8), dtype)
    name = jnp.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"implementation='cudnn' .*does not support {name} inputs; "
                                         r"use implementation='reference', 'blockwise', 'xla' or None"):  # fmt: skip
        jattn.dot_product_attention(x, x, x, implementation="cudnn")


def test_the_error_names_the_implementations_that_can():
    with pytest.raises(
        ValueError, match=r"does not support sinks; use implementation='reference', 'blockwise' or None"
    ):
        _capabilities.check_supported("xla", {"sinks": "sinks"})
