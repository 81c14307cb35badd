"""Benchmark settings: one frozen dataclass and the two presets (``quick`` and ``full``)."""

from __future__ import annotations

import dataclasses
import fnmatch

SUITE_NAMES = ("matmul", "attention", "seed", "module", "decode", "flex", "parallel", "serve")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything a run depends on; recorded in the results file.

    Attributes:
        preset: ``"quick"`` or ``"full"`` (a label; the values below are what count).
        suites: suites to run; ``matmul`` is always added (it is the roofline).
        seq_lengths: attention sequence-length sweep.
        kv_seq: key/value length for cross-attention; None = self-attention.
        kv_fill: only the first ``kv_fill`` keys are real (``key_value_seq_lengths``,
            e.g. a decode step over a partly filled cache); None = all.
        batch, heads, dim: attention shape, layout ``(batch, seq, heads, dim)``.
        kv_heads: key/value heads (grouped-query attention); None = ``heads``.
        dtype: input dtype name.
        modes: any of ``"fwd"``, ``"fwd+bwd"``, ``"jvp"`` (forward mode) and
            ``"hvp"`` (a Hessian-vector product, forward over reverse).
        causal: which of non-causal (False) and causal (True) to run.
        impls: fnmatch patterns on implementation labels (``"jattn:*"``,
            ``"jax.nn:xla"``); a bare name ``x`` means ``jattn:x``. None = all.
        repeats: timed calls per case.
        warmup: untimed calls before them.
        matmul_sizes: square matmul sizes N for the roofline.
        module_seq, module_features, module_heads: the ``module`` suite's shape
            (features and heads also the ``decode`` suite's).
        decode_max_length: KV-cache positions of the ``decode`` suite.
        decode_fills: cache fills at which the ``decode`` suite times one
            token; each in ``[1, decode_max_length)``.
        seed_sizes: ``(kind, seq, dim)`` for the ``seed`` suite; kind is
            ``"single"`` (one query against ``seq`` keys) or ``"self"``
            (self-attention of a ``(1, seq, dim)`` batch).
        flex_seq: sequence length of the ``flex`` suite's ALiBi cases.
        flex_doc_seq, flex_docs: length and number of packed documents of its
            document-mask cases.
        parallel_timed_seq: the ``parallel`` suite times its cases up to this
            sequence length; longer ones are compiled only (memory, collectives
            and visited blocks need no run; one fwd+bwd call at 32768 takes
            minutes on a CPU). Raise it on accelerators.
        backward_factor: FLOP convention for the backward (see ``bench.flops``).
        serve_kv_lens: ``(long, short)`` cached tokens of the ``serve`` suite's decode batch (one long
            sequence, fifteen short) and its mixed batch.
        serve_scaling: the ``serve`` suite's all-equal decode batches (time should follow the tokens).
        serve_pages_per_chunk: ``pages_per_chunk`` of ``jattn.paged.ragged_paged_attention`` there.
    """

    preset: str = "full"
    suites: tuple[str, ...] = SUITE_NAMES
    seq_lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    kv_seq: int | None = None
    kv_fill: int | None = None
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None
    dim: int = 64
    dtype: str = "float32"
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    causal: tuple[bool, ...] = (False, True)
    impls: tuple[str, ...] | None = None
    repeats: int = 10
    warmup: int = 2
    matmul_sizes: tuple[int, ...] = (1024, 2048)
    module_seq: int = 2048
    module_features: int = 512
    module_heads: int = 8
    decode_max_length: int = 8192
    decode_fills: tuple[int, ...] = (512, 8191)
    seed_sizes: tuple[tuple[str, int, int], ...] = (
        ("single", 2, 3),
        ("self", 3, 3),
        ("single", 256, 64),
        ("self", 64, 32),
        ("self", 256, 64),
        ("self", 1024, 64),
    )
    flex_seq: int = 4096
    flex_doc_seq: int = 8192
    flex_docs: int = 8
    parallel_timed_seq: int = 8192
    backward_factor: float = 2.5
    serve_kv_lens: tuple[int, int] = (8192, 128)
    serve_scaling: tuple[int, ...] = (512, 2048)
    serve_pages_per_chunk: int = 8

    def wants(self, impl: str) -> bool:
        """Whether implementation label ``impl`` is selected by ``impls``."""
        if self.impls is None:
            return True
        patterns = [p if ":" in p else f"jattn:{p}" for p in self.impls]
        return any(fnmatch.fnmatchcase(impl, p) for p in patterns)


QUICK = BenchConfig(
    preset="quick",
    seq_lengths=(128, 256, 512),
    repeats=5,
    warmup=1,
    matmul_sizes=(512, 1024),
    module_seq=256,
    decode_max_length=1024,
    decode_fills=(128, 1023),
    flex_seq=512,
    flex_doc_seq=1024,
    serve_kv_lens=(1024, 128),
    serve_scaling=(128, 512),
    seed_sizes=(("single", 2, 3), ("self", 3, 3), ("single", 256, 64), ("self", 256, 64)),
)
FULL = BenchConfig()
PRESETS = {"quick": QUICK, "full": FULL}
