"""What each implementation honours: the one capability table (implementation x feature -> support).

Everything that asks "can this implementation run this call?" reads :data:`CAPABILITIES`: the auto
rule (``_dispatch.choose`` only considers implementations that honour every feature a call uses
*exactly*), the "does not support" errors of an explicit ``implementation=`` or ``sequence_parallel=``
(:func:`check_supported`), sequence-parallel planning (its row is ``"sequence_parallel"``) and the
README's capability table (:func:`markdown_table`, checked by a test).

A feature is an option of the call (a column per field of :class:`~jattn._options.CallOptions`,
fields given together sharing one column) or a property of its shapes and values (:data:`PROPERTIES`).
To add an option: a field in ``CallOptions`` (it becomes a column here, supported by default), then a
``Support.NO`` cell for each implementation that lacks it. To add an implementation: a row here and a
``case`` in ``_dispatch.run``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import jax.numpy as jnp

from . import _checks
from ._options import AttentionInputs, CallOptions


class Support(enum.Enum):
    """One cell of the table."""

    YES = "yes"  # computed as jattn defines it
    NO = "no"  # cannot honour: asking for it raises ValueError, auto never picks it
    DIFFERS = "differs"  # runs, with jax.nn's semantics instead of jattn's (documented); auto never picks it
    REPAIRED = "differs, auto repairs"  # asked for by name: jax.nn's semantics; auto picks it and repairs the result
    EMULATED = "no, auto emulates"  # asked for by name: refused; auto passes it in another form (and repairs)


def _option_columns() -> tuple[str, ...]:
    """One column per public ``CallOptions`` field, fields of one ``group`` (given together) sharing it."""
    columns: list[str] = []
    for field in dataclasses.fields(CallOptions):
        column = field.metadata.get("group", field.name)
        if column not in columns:
            columns.append(column)
    return tuple(columns)


OPTIONS: tuple[str, ...] = _option_columns()
"""The option columns, derived from ``CallOptions``'s fields (``query_offset`` is jattn.nnx's decode offset)."""

SYMBOLIC = "symbolic sequence length"
V_DIM = "v_dim != dim"
EMPTY_ROWS = "rows that may see no key"
BIAS_ROWS = "bias rows of -inf"
FLOAT64 = "float64"
WIDE_FLOATS = "float32 or float64 inputs"
ONE_SIDED_WINDOW_ONLY = "window with right > 0"
SEQUENCE_PARALLEL = "sequence_parallel"

PROPERTIES: Mapping[str, str] = {
    SYMBOLIC: "a symbolic q_seq or kv_seq (jax.export)",
    V_DIM: "values with their own feature size",
    EMPTY_ROWS: "a query row can see no key (lengths, masks, a window): jattn gives zeros, jax.nn the mean of V",
    BIAS_ROWS: "a bias row of -inf hides every key: jattn gives zeros, jax.nn NaN",
    FLOAT64: "float64 inputs: jattn's softmax runs in float64, jax.nn's in float32",
    WIDE_FLOATS: "float32 or float64 inputs (jax.nn's cuDNN kernel takes float16 and bfloat16)",
    ONE_SIDED_WINDOW_ONLY: "a local window that reaches right of the diagonal without is_causal",
    SEQUENCE_PARALLEL: "the sequence split over a mesh axis (ring or all-gather K/V)",
}
"""Features that are properties of the call rather than options, with what each means."""

FEATURES: tuple[str, ...] = (*OPTIONS, *PROPERTIES)

_JAX_NN_LACKS = {
    "query_segment_ids/key_value_segment_ids": Support.EMULATED,  # as the dense mask they define (_jax_nn)
    "logits_soft_cap": Support.NO,
    "score_mod": Support.NO,
    "mask_mod": Support.NO,
    "block_mask": Support.NO,
    "sinks": Support.NO,
    V_DIM: Support.NO,
    EMPTY_ROWS: Support.REPAIRED,  # jax.nn's output with the rows that see no key set to zero (_jax_nn)
    BIAS_ROWS: Support.DIFFERS,
    FLOAT64: Support.DIFFERS,
    SEQUENCE_PARALLEL: Support.NO,
}

DESCRIPTIONS: Mapping[str, str] = {
    "reference": "the per-example core vmapped over batch and heads",
    "blockwise": "the blockwise kernel",
    "sequence_parallel": "the blockwise kernel over a sharded sequence",
    "xla": "jax.nn.dot_product_attention",
    "cudnn": "jax.nn.dot_product_attention",
}

CAPABILITIES: Mapping[str, Mapping[str, Support]] = {
    "reference": {SEQUENCE_PARALLEL: Support.NO},
    "blockwise": {SYMBOLIC: Support.NO},
    # Sinks join after the merge; mods see global positions (each ring pair's chunk starts, kv_offset).
    "sequence_parallel": {
        SYMBOLIC: Support.NO,
        "block_mask": Support.NO,
    },
    "xla": _JAX_NN_LACKS,
    "cudnn": {**_JAX_NN_LACKS, ONE_SIDED_WINDOW_ONLY: Support.NO, WIDE_FLOATS: Support.NO},
}
"""implementation -> feature -> support; a feature not listed in a row is :attr:`Support.YES`."""


def support(implementation: str, feature: str) -> Support:
    """One cell of :data:`CAPABILITIES`."""
    return CAPABILITIES[implementation].get(feature, Support.YES)


def features_of(inputs: AttentionInputs) -> dict[str, str]:
    """The features a normalized call uses, each with how to name it in a message.

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn._options import CallOptions
        >>> from jattn._prepare import prepare
        >>> q, v = jnp.zeros((1, 3, 2, 4), jnp.float32), jnp.zeros((1, 3, 2, 5), jnp.float32)
        >>> sorted(features_of(prepare(q, q, v, CallOptions(is_causal=True)).inputs))
        ['float32 or float64 inputs', 'is_causal', 'scale', 'v_dim != dim']
    """
    query, key, value, bias, mask, opts = inputs
    static, arrays, shared = opts.static, opts.arrays, opts.shared
    used = {
        "bias": bias is not None,
        "mask": mask is not None,
        "query_seq_lengths": arrays.q_length is not None,
        "key_value_seq_lengths": arrays.kv_length is not None,
        "query_segment_ids/key_value_segment_ids": arrays.q_segment_ids is not None,
        "sinks": shared.sinks is not None,
        "block_mask": opts.block_mask is not None,
        "query_offset": arrays.q_offset is not None,
        "scale": True,
        "is_causal": static.is_causal,
        "local_window_size": static.local_window_size is not None,
        "logits_soft_cap": static.logits_soft_cap is not None,
        "score_mod": static.score_mod is not None,
        "mask_mod": static.mask_mod is not None,
    }
    assert set(used) == set(OPTIONS), "every CallOptions column says when it is used"
    features = {name: name for name, on in used.items() if on}
    q_seq, kv_seq, dim, v_dim = query.shape[1], key.shape[1], query.shape[-1], value.shape[-1]
    concrete = _checks.is_concrete(q_seq) and _checks.is_concrete(kv_seq)
    if not concrete:
        features[SYMBOLIC] = f"{SYMBOLIC} (q_seq={q_seq}, kv_seq={kv_seq})"
    if v_dim != dim:
        features[V_DIM] = f"{V_DIM} ({v_dim} != {dim})"
    # Causal rows always see key 0; a window leaves row i its own key while q_seq <= kv_seq.
    window = static.local_window_size
    lengths_or_ids = any(a is not None for a in arrays[:4])
    # A window leaves query i its own key while q_seq <= kv_seq and queries start at position 0.
    window_may_empty = window is not None and (arrays.q_offset is not None or not concrete or q_seq > kv_seq)
    if lengths_or_ids or mask is not None or static.mask_mod is not None or window_may_empty:
        features[EMPTY_ROWS] = EMPTY_ROWS
    if bias is not None:
        features[BIAS_ROWS] = BIAS_ROWS
    if jnp.dtype(query.dtype) == jnp.float64:
        features[FLOAT64] = FLOAT64
    if jnp.dtype(query.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        features[WIDE_FLOATS] = f"{jnp.dtype(query.dtype).name} inputs"
    if window is not None and window[1] > 0 and not static.is_causal:
        features[ONE_SIDED_WINDOW_ONLY] = ONE_SIDED_WINDOW_ONLY
    return features


def lacking(implementation: str, features: Mapping[str, str], *, exactly: bool = False) -> list[str]:
    """The features ``implementation`` cannot honour (with ``exactly``: nor computes as jattn defines them,
    even with the auto rule's repair)."""
    refused = {Support.NO, Support.DIFFERS} if exactly else {Support.NO, Support.EMULATED}
    return [shown for feature, shown in features.items() if support(implementation, feature) in refused]


def repaired(implementation: str, features: Mapping[str, str]) -> bool:
    """Whether auto, running ``implementation``, must repair its result or emulate an option
    (:attr:`Support.REPAIRED` and :attr:`Support.EMULATED` cells)."""
    return any(support(implementation, feature) in (Support.REPAIRED, Support.EMULATED) for feature in features)


def check_supported(implementation: str, features: Mapping[str, str]) -> None:
    """Raises ValueError naming what ``implementation`` cannot honour, and the implementations that can."""
    missing = lacking(implementation, features)
    if not missing:
        return
    able = [name for name in CAPABILITIES if name != "sequence_parallel" and not lacking(name, features)]
    choices = ", ".join(repr(name) for name in able) + (" or None" if able else "None")
    subject = "sequence_parallel" if implementation == "sequence_parallel" else f"implementation={implementation!r}"
    raise ValueError(
        f"{subject} ({DESCRIPTIONS[implementation]}) does not support {', '.join(missing)}; "
        f"use implementation={choices}"
    )


def markdown_table() -> str:
    """The capability table as Markdown (the README's copy is checked against it)."""
    rows = [f"| feature | {' | '.join(f'`{name}`' for name in CAPABILITIES)} |"]
    rows.append("|---" * (len(CAPABILITIES) + 1) + "|")
    for feature in FEATURES:
        if feature == "query_offset":  # jattn.nnx's decode offset: no public argument
            continue
        label = f"`{feature}`" if feature in OPTIONS else PROPERTIES[feature]
        rows.append(f"| {label} | {' | '.join(support(name, feature).value for name in CAPABILITIES)} |")
    return "\n".join(rows)


def rewrite_readme(path: str = "README.md") -> None:
    """Regenerates the README's table between its markers:
    ``python -c "from jattn._capabilities import rewrite_readme; rewrite_readme()"``."""
    import pathlib
    import re

    readme = pathlib.Path(path)
    start, end = "<!-- capabilities:start -->\n", "\n<!-- capabilities:end -->"
    text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: start + markdown_table() + end,
                  readme.read_text(), flags=re.S)  # fmt: skip
    readme.write_text(text)
