"""One serving step of the NNX modules over a paged KV cache (``jattn.paged``): the pools go in and come back.

Why functional (pools in, pools out) rather than pools held as ``nnx.Cache`` variables: in a serving
engine the page pools are the engine's memory, shared by every sequence, sized once and donated to
the compiled step so that XLA writes them in place (``jax.jit(step, donate_argnums=...)``); the
module stays pure weights, so one module serves any number of pools and ``nnx.split`` / ``nnx.merge``
never copy a cache. This is how JAX serving stacks pass their KV caches (a list of per-layer arrays
through the jitted model function, as in tpu-inference and vLLM's TPU backend).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Float

from jattn import _checks, paged

from ._fields import ModuleFields
from ._projection import promoted_dtype

if TYPE_CHECKING:  # a cycle at run time: _attention imports this module
    from ._attention import MultiHeadAttention


class PagedKV(NamedTuple):
    """One layer's page pools (a pytree): ``key_pages (num_pages, page_size, kv_heads, dim)`` and
    ``value_pages (num_pages, page_size, kv_heads, v_dim)``.

    Made by ``init_pages``, passed to and returned by ``paged_step``; a model keeps one per layer.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jattn import nnx as jnnx
        >>> pages = jnnx.PagedKV(jnp.zeros((7, 4, 2, 8)), jnp.zeros((7, 4, 2, 3)))
        >>> [x.shape for x in jax.tree.leaves(pages)]  # a pytree: jit arguments, donated as a whole
        [(7, 4, 2, 8), (7, 4, 2, 3)]
    """

    key_pages: Array
    value_pages: Array


def sliding_window(local_window_size: int | tuple[int, int] | None) -> int | None:
    """The paged kernel's ``sliding_window`` of a module's ``local_window_size`` under causal attention.

    ``(left, right)`` lets query ``i`` see ``i - left <= j`` (``right`` is moot when causal): the last
    ``left + 1`` positions, itself included.
    """
    if local_window_size is None:
        return None
    left = local_window_size if isinstance(local_window_size, int) else local_window_size[0]
    return left + 1


def check_step(module: ModuleFields, x: Array, pages: Any, meta: Any) -> None:
    """What the module adds to the checks of ``jattn.paged``: a self-attention module that can serve,
    ``(tokens, in_features)`` inputs, pools of its kv heads and head sizes, a ``BatchMetadata``."""
    if module.attention_fn is not None:
        raise ValueError(
            "paged_step runs jattn's paged attention, not attention_fn; "
            f"got a module with attention_fn={module.attention_fn!r} (build it with attention_fn=None to serve)"
        )
    if module.in_kv_features != module.in_features:
        raise ValueError(
            "paged_step is self-attention: in_kv_features must equal in_features; "
            f"got in_kv_features={module.in_kv_features}, in_features={module.in_features}"
        )
    if module.dropout_rate > 0 and not module.deterministic:
        raise ValueError(
            f"paged_step has no dropout; got dropout_rate={module.dropout_rate} while training "
            "(call module.eval() to serve)"
        )
    _checks.check_floating("inputs", x)
    _checks.check_rank("inputs", x, (2,), f"(tokens, in_features={module.in_features})")
    if x.shape[1] != module.in_features:
        raise ValueError(f"inputs must have shape (tokens, in_features={module.in_features}); got {x.shape}")
    if not isinstance(pages, PagedKV):
        raise TypeError(f"pages must be a jattn.nnx.PagedKV (see init_pages); got {type(pages).__name__}")
    if not isinstance(meta, paged.BatchMetadata):
        raise TypeError(f"meta must be a jattn.paged.BatchMetadata (PageAllocator.metadata); got {type(meta).__name__}")
    sizes = {"key_pages": module.head_dim, "value_pages": module.value_head_dim}
    for name, pool in zip(("key_pages", "value_pages"), pages, strict=True):
        shape = jnp.shape(pool)
        if len(shape) != 4 or shape[2:] != (module.num_kv_heads, sizes[name]):
            raise ValueError(
                f"pages.{name} must have shape (num_pages, page_size, kv_heads={module.num_kv_heads}, "
                f"{'dim' if name == 'key_pages' else 'v_dim'}={sizes[name]}); got {shape}"
            )
    tokens = x.shape[0]
    if jnp.shape(meta.slot_mapping) != (tokens,):
        raise ValueError(
            f"meta.slot_mapping must have shape (tokens,)=({tokens},), one slot per input row "
            f"(PageAllocator.metadata(..., max_tokens={tokens})); got {jnp.shape(meta.slot_mapping)}"
        )


class PagedMethods(ModuleFields):
    """``init_pages`` / ``paged_step`` of a ``MultiHeadAttention`` (its projections ``query``, ``key``,
    ``value``, ``out`` and the attributes of ``ModuleFields``)."""

    query: Any
    key: Any
    value: Any
    out: Any

    def init_pages(self, num_pages: int, page_size: int, *, dtype: Any = None) -> PagedKV:
        """Empty page pools for :meth:`paged_step`: ``(num_pages, page_size, kv_heads, dim / v_dim)``.

        Args:
            num_pages: pages in the pool, shared by every sequence (``jattn.paged.PageAllocator``).
            page_size: tokens per page.
            dtype: the pools' dtype; default ``dtype`` of the module, else ``param_dtype`` (it must be
                the computation dtype of the steps, or a quantized dtype with ``k_scale`` / ``v_scale``).

        Raises:
            ValueError: ``num_pages`` or ``page_size`` not a positive int.

        Example:
            >>> from flax import nnx
            >>> from jattn import nnx as jnnx
            >>> mha = jnnx.MultiHeadAttention(4, 16, num_kv_heads=2, rngs=nnx.Rngs(0))
            >>> pages = mha.init_pages(num_pages=7, page_size=3)
            >>> pages.key_pages.shape, pages.value_pages.shape
            ((7, 3, 2, 4), (7, 3, 2, 4))
        """
        _checks.check_positive_int("num_pages", num_pages)
        _checks.check_positive_int("page_size", page_size)
        if dtype is None:
            dtype = self.dtype if self.dtype is not None else self.param_dtype
        return PagedKV(
            jnp.zeros((num_pages, page_size, self.num_kv_heads, self.head_dim), dtype),
            jnp.zeros((num_pages, page_size, self.num_kv_heads, self.value_head_dim), dtype),
        )

    def paged_step(
        self,
        inputs: Float[ArrayLike, "tokens in_features"],
        pages: PagedKV,
        meta: paged.BatchMetadata,
        *,
        k_scale: float | None = None,
        v_scale: float | None = None,
    ) -> tuple[Float[Array, "tokens out_features"], PagedKV]:
        """One serving step: the new tokens of many sequences (prefill chunks and decode tokens) in one call.

        ``inputs`` holds the rows of ``meta``'s ragged batch: sequence ``s`` owns rows
        ``cu_q_lens[s] : cu_q_lens[s+1]``, its new tokens, which follow ``kv_lens[s] - q_len`` cached
        ones. The step projects every row, writes the keys and values into the pools at
        ``meta.slot_mapping`` (``jattn.paged.write``), attends causally over each sequence's pages
        (``jattn.paged.ragged_paged_attention``) and projects back. A sequence's rows give what
        :meth:`__call__` gives the same tokens after :meth:`init_cache` with the same history, with the
        same weights: window, soft cap, sinks and mods included (a ``mask_mod`` / ``score_mod`` sees the
        sequence's index in the batch as ``batch``). Rows past ``cu_q_lens[num_seqs]`` are padding: the
        output projection of a zero context, to be ignored.

        The pools are passed in and returned, not held by the module: jit the step with them donated
        (``jax.jit(step, donate_argnums=...)``) and XLA updates them in place; new metadata values never
        recompile. Wrong concrete metadata raises the errors of ``jattn.paged``; under jit it is
        harmless (see :func:`jattn.paged.ragged_paged_attention`). Inference only: no dropout. The
        module's ``implementation``, ``block_q``, ``block_kv`` and ``sequence_parallel`` choose among the
        dense kernels and do not apply here: the step always runs the paged kernel.

        Args:
            inputs: float ``(tokens, in_features)``, the batch's rows.
            pages: :class:`PagedKV` of this layer (from :meth:`init_pages`).
            meta: the step's ``jattn.paged.BatchMetadata`` (``PageAllocator.metadata(..., max_tokens=tokens)``).
            k_scale: quantized key pages (int8, float8): stored as ``k / k_scale``, read as ``page * k_scale``.
            v_scale: the same for values.

        Returns:
            ``(outputs (tokens, out_features), pages)``: the rows in the computation dtype and the pools
            with this step's keys and values written.

        Raises:
            ValueError: a module with ``attention_fn``, ``in_kv_features != in_features``, dropout while
                training, inputs not ``(tokens, in_features)``, pools of other kv heads or head sizes, a
                ``slot_mapping`` not ``(tokens,)``, pools of another dtype than the computation's (unless
                quantized with a scale), and the errors of ``jattn.paged``.
            TypeError: non-float inputs, ``pages`` not a :class:`PagedKV`, ``meta`` not a ``BatchMetadata``.

        Example:
            Two sequences: one prefills 3 tokens, one 2; then both decode one token.

            >>> import jax, jax.numpy as jnp
            >>> from flax import nnx
            >>> from jattn import nnx as jnnx, paged
            >>> mha = jnnx.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
            >>> alloc = paged.PageAllocator(num_pages=6, page_size=2, pages_per_seq=3)
            >>> pages = mha.init_pages(6, 2)
            >>> alloc.reserve("a", 4); alloc.reserve("b", 3)
            >>> x = jax.random.normal(jax.random.key(0), (7, 8), jnp.float32)  # a's 4 tokens, then b's 3
            >>> meta = alloc.metadata([("a", 0, 3), ("b", 0, 2)], max_seqs=2, max_tokens=5)
            >>> prefill, pages = mha.paged_step(jnp.concatenate([x[:3], x[4:6]]), pages, meta)
            >>> meta = alloc.metadata([("a", 3, 1), ("b", 2, 1)], max_seqs=2, max_tokens=5)
            >>> rows = jnp.concatenate([x[3:4], x[6:7], jnp.zeros((3, 8), jnp.float32)])  # 3 padding rows
            >>> decode, pages = mha.paged_step(rows, pages, meta)
            >>> full_a = mha(x[None, :4], is_causal=True)[0]  # the whole sequence at once
            >>> bool(jnp.allclose(decode[0], full_a[3], atol=1e-5)), decode.shape
            (True, (5, 8))
        """
        x = jnp.asarray(inputs)
        check_step(self, x, pages, meta)
        dtype = promoted_dtype(self.dtype, self.param_dtype, x)
        for name, pool, scale in (("key_pages", pages.key_pages, k_scale), ("value_pages", pages.value_pages, v_scale)):
            if scale is None and pool.dtype != dtype:
                raise ValueError(
                    f"pages.{name} has dtype {pool.dtype} but this step computes in {dtype}; pass dtype= to "
                    "init_pages, cast the inputs, or give a quantized pool its scale (k_scale / v_scale)"
                )
        query, key, value = self.query(x, dtype), self.key(x, dtype), self.value(x, dtype)
        table = tuple(jnp.asarray(a) for a in (meta.kv_lens, meta.page_indices, meta.cu_q_lens, meta.num_seqs))
        key_pages, value_pages = paged.write(
            *pages, key, value, jnp.asarray(meta.slot_mapping), k_scale=k_scale, v_scale=v_scale
        )
        config = self.attention_config
        context = paged.ragged_paged_attention(
            query,
            key_pages,
            value_pages,
            *table,
            sliding_window=sliding_window(config.local_window_size),
            logits_soft_cap=config.logits_soft_cap,
            sinks=None if self.sinks is None else self.sinks[...],
            score_mod=config.score_mod,
            mask_mod=config.mask_mod,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        return self.out(context, dtype), PagedKV(key_pages, value_pages)


class BlockPagedMethods:
    """``init_pages`` / ``paged_step`` of an ``AttentionBlock`` (``attention``, ``norm``, ``pre_norm``)."""

    attention: MultiHeadAttention
    norm: nnx.LayerNorm
    pre_norm: bool

    def _norm(self, x: Array) -> Array:
        raise NotImplementedError  # AttentionBlock's

    def init_pages(self, num_pages: int, page_size: int, *, dtype: Any = None) -> PagedKV:
        """The attention's empty page pools; see :meth:`MultiHeadAttention.init_pages`.

        Example:
            >>> from flax import nnx
            >>> from jattn import nnx as jnnx
            >>> block = jnnx.AttentionBlock(2, 8, rngs=nnx.Rngs(0))
            >>> block.init_pages(5, 3).key_pages.shape  # (num_pages, page_size, kv_heads, dim)
            (5, 3, 2, 4)
        """
        return self.attention.init_pages(num_pages, page_size, dtype=dtype)

    def paged_step(
        self,
        inputs: Float[ArrayLike, "tokens in_features"],
        pages: PagedKV,
        meta: paged.BatchMetadata,
        *,
        k_scale: float | None = None,
        v_scale: float | None = None,
    ) -> tuple[Float[Array, "tokens in_features"], PagedKV]:
        """One serving step of the block, ``norm(x + mha(x))`` (or pre-norm) over a ragged batch.

        See :meth:`MultiHeadAttention.paged_step` for the rows, ``meta``, the pools and the errors; a
        sequence's rows equal what :meth:`__call__` gives after :meth:`init_cache` with the same history.

        Args:
            inputs: float ``(tokens, in_features)``.
            pages: :class:`PagedKV` of this block (:meth:`init_pages`).
            meta: the step's ``jattn.paged.BatchMetadata``.
            k_scale: see :meth:`MultiHeadAttention.paged_step`.
            v_scale: see :meth:`MultiHeadAttention.paged_step`.

        Returns:
            ``(outputs (tokens, in_features), pages)``.

        Raises:
            TypeError, ValueError: see :meth:`MultiHeadAttention.paged_step`.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from flax import nnx
            >>> from jattn import nnx as jnnx, paged
            >>> block = jnnx.AttentionBlock(2, 8, pre_norm=True, rngs=nnx.Rngs(0))
            >>> alloc = paged.PageAllocator(num_pages=4, page_size=2, pages_per_seq=2)
            >>> alloc.reserve("a", 3)
            >>> meta = alloc.metadata([("a", 0, 3)], max_seqs=1, max_tokens=3)
            >>> x = jax.random.normal(jax.random.key(0), (3, 8), jnp.float32)
            >>> y, pages = block.paged_step(x, block.init_pages(4, 2), meta)
            >>> bool(jnp.allclose(y, block(x[None], is_causal=True)[0], atol=1e-5))
            True
        """
        x = jnp.asarray(inputs)
        _checks.check_floating("inputs", x)  # before the norm, which would take token ids
        _checks.check_rank("inputs", x, (2,), "(tokens, in_features)")
        attended, pages = self.attention.paged_step(
            self._norm(x) if self.pre_norm else x, pages, meta, k_scale=k_scale, v_scale=v_scale
        )
        y = x.astype(attended.dtype) + attended
        return (y if self.pre_norm else self._norm(y)), pages
