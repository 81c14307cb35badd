"""Continuous batching over jattn's paged KV cache: a small transformer serves a stream of requests.

Requests with prompts of different lengths arrive at different steps and finish at different steps.
Every step sends ONE ragged batch through ONE compiled function: the decode tokens of the running
requests and chunks of the prompts being prefilled, side by side (chunked prefill). K/V live in pages
of one pool per layer, handed out by ``jattn.paged.PageAllocator`` when a request is admitted and
taken back when it finishes; the pools are donated to the step, so XLA writes them in place. New
batches are new metadata *values* of fixed shapes: the step never recompiles.

At the end every request's greedy tokens are checked against decoding that request alone with the
contiguous KV cache (``init_cache``), with the same weights.

Run: ``python examples/serve.py`` (about 15 s on a 2-core CPU; ``--quick`` for a few seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int
from tqdm import tqdm

from jattn import nnx as jnnx
from jattn import paged


class Layer(nnx.Module):
    """A pre-norm transformer layer: a jattn ``AttentionBlock`` (``x + mha(norm(x))``), then an MLP."""

    def __init__(self, features: int, heads: int, kv_heads: int, *, rngs: nnx.Rngs):
        self.attention = jnnx.AttentionBlock(heads, features, num_kv_heads=kv_heads, pre_norm=True, rngs=rngs)
        self.norm = nnx.LayerNorm(features, rngs=rngs)
        self.up = nnx.Linear(features, 4 * features, rngs=rngs)
        self.down = nnx.Linear(4 * features, features, rngs=rngs)

    def mlp(self, x: Float[Array, "*rows features"]) -> Float[Array, "*rows features"]:
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class TinyLM(nnx.Module):
    """Embedding, ``layers`` x (attention block + MLP), LayerNorm, LM head; random weights."""

    def __init__(self, vocab: int, features: int, *, heads: int, kv_heads: int, layers: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, features, rngs=rngs)
        self.layers = nnx.List([Layer(features, heads, kv_heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(features, rngs=rngs)
        self.head = nnx.Linear(features, vocab, rngs=rngs)

    def __call__(
        self, tokens: Int[Array, "batch seq"], lengths: Int[Array, " batch"]
    ) -> Float[Array, "batch seq vocab"]:
        """The contiguous-cache path (after ``init_cache``): ``lengths`` of the right-padded new tokens."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer.mlp(layer.attention(x, is_causal=True, query_seq_lengths=lengths))
        return self.head(self.norm(x))

    def paged_step(
        self, tokens: Int[Array, " tokens"], pages: list[jnnx.PagedKV], meta: paged.BatchMetadata
    ) -> tuple[Float[Array, "tokens vocab"], list[jnnx.PagedKV]]:
        """The paged path: one ragged batch of many sequences' new tokens, each layer over its pools."""
        x, new_pages = self.embed(tokens), []
        for layer, layer_pages in zip(self.layers, pages, strict=True):
            x, layer_pages = layer.attention.paged_step(x, layer_pages, meta)
            x = layer.mlp(x)
            new_pages.append(layer_pages)
        return self.head(self.norm(x)), new_pages


@dataclasses.dataclass
class Request:
    """A prompt, how many tokens to generate, and the state of its decoding."""

    name: int
    arrival: int  # the step it arrives at
    prompt: list[int]
    max_new: int
    cached: int = 0  # tokens whose K/V are in the pages
    generated: list[int] = dataclasses.field(default_factory=list)

    @property
    def known(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def lifetime(self) -> int:  # tokens it will ever cache (the last generated one is never fed back)
        return len(self.prompt) + self.max_new - 1


def make_requests(args: argparse.Namespace) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.integers(0, 3, args.requests))
    return [
        Request(i, int(t), rng.integers(0, args.vocab, rng.integers(2, args.max_prompt + 1)).tolist(), int(n))
        for i, (t, n) in enumerate(zip(arrivals, rng.integers(2, args.max_new + 1, args.requests), strict=True))
    ]


def schedule(running: list[Request], args: argparse.Namespace) -> list[tuple[Request, int]]:
    """This step's ``(request, new tokens)``: every decoding request one token, then prompt chunks within
    the token budget (decode first, as vLLM does: it keeps the running requests' latency flat)."""
    decoding = [(r, 1) for r in running if r.cached >= len(r.prompt)]
    budget, batch = args.max_tokens - len(decoding), decoding
    for r in running:
        if r.cached < len(r.prompt) and budget > 0:
            new = min(args.chunk, len(r.prompt) - r.cached, budget)
            batch.append((r, new))
            budget -= new
    return batch


def serve(model: TinyLM, requests: list[Request], args: argparse.Namespace) -> dict[str, Any]:
    """Runs the stream to the end; returns throughput and the compiled step's cache size."""
    graphdef, state = nnx.split(model)

    def step(state, pages, tokens, meta):
        logits, pages = nnx.merge(graphdef, state).paged_step(tokens, pages, meta)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), pages  # greedy: only the ids leave the device

    step = jax.jit(step, donate_argnums=(1,))
    alloc = paged.PageAllocator(args.num_pages, args.page_size, args.pages_per_seq)
    pages = [layer.attention.init_pages(args.num_pages, args.page_size) for layer in model.layers]
    waiting, running, t, steps, compile_s, peak, page_waits, processed = list(requests), [], 0, 0, 0.0, 0, set(), 0
    bar = tqdm(total=sum(r.max_new for r in requests), unit="tok", disable=args.no_progress)
    start = time.perf_counter()
    while waiting or running:
        while waiting and waiting[0].arrival <= t and len(running) < args.max_seqs:
            try:  # pages for the whole request up front: admitted requests never run out (no preemption)
                alloc.reserve(waiting[0].name, waiting[0].lifetime)
            except paged.OutOfPagesError:
                page_waits.add(waiting[0].name)
                break  # it waits until a running request frees its pages
            running.append(waiting.pop(0))
        peak = max(peak, len(running))
        t += 1
        if not running:
            continue
        batch = schedule(running, args)
        meta = alloc.metadata([(r.name, r.cached, n) for r, n in batch], args.max_seqs, args.max_tokens)
        tokens = np.zeros(args.max_tokens, np.int32)
        for i, (r, n) in enumerate(batch):
            tokens[meta.cu_q_lens[i] : meta.cu_q_lens[i + 1]] = r.known[r.cached : r.cached + n]
        tic = time.perf_counter()
        next_tokens, pages = step(state, pages, tokens, meta)
        next_tokens = np.asarray(next_tokens)
        if steps == 0:
            compile_s = time.perf_counter() - tic
        steps += 1
        processed += int(meta.cu_q_lens[-1])
        for i, (r, n) in enumerate(batch):
            r.cached += n
            if r.cached == len(r.known):  # its last known token went in: the next one comes out
                r.generated.append(int(next_tokens[meta.cu_q_lens[i + 1] - 1]))
                bar.update(1)
            if len(r.generated) == r.max_new:
                alloc.free(r.name)
                running.remove(r)
    bar.close()
    seconds = time.perf_counter() - start - compile_s
    generated = sum(r.max_new for r in requests)
    assert alloc.num_free == args.num_pages  # every page came back
    return dict(steps=steps, seconds=seconds, compile_s=compile_s, tokens_per_s=generated / seconds,
                processed_per_s=processed / seconds, generated=generated, peak=peak, page_waits=len(page_waits),
                compilations=step._cache_size())  # fmt: skip


def decode_alone(model: TinyLM, request: Request, args: argparse.Namespace) -> list[int]:
    """The request alone through the contiguous KV cache: the right-padded prompt, then one token a call."""
    for layer in model.layers:
        layer.attention.init_cache(1, args.max_prompt + args.max_new)
    prompt = np.zeros((1, args.max_prompt), np.int32)  # one shape for every prompt: one compilation
    prompt[0, : len(request.prompt)] = request.prompt
    logits = _contiguous(model, jnp.asarray(prompt), jnp.asarray([len(request.prompt)], jnp.int32))
    tokens = [int(jnp.argmax(logits[0, len(request.prompt) - 1]))]
    while len(tokens) < request.max_new:
        logits = _contiguous(model, jnp.asarray([[tokens[-1]]], jnp.int32), jnp.ones((1,), jnp.int32))
        tokens.append(int(jnp.argmax(logits[0, 0])))
    for layer in model.layers:
        layer.attention.clear_cache()
    return tokens


@nnx.jit
def _contiguous(model: TinyLM, tokens: Array, lengths: Array) -> Array:
    return model(tokens, lengths)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few small requests (a few seconds)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--max-prompt", type=int, default=48)
    p.add_argument("--max-new", type=int, default=24)
    p.add_argument("--max-seqs", type=int, default=8, help="sequences per step")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per step (decode + prefill chunks)")
    p.add_argument("--chunk", type=int, default=16, help="prefill chunk")
    p.add_argument("--page-size", type=int, default=8)
    p.add_argument("--num-pages", type=int, default=32, help="pages in each layer's pool")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--vocab", type=int, default=211)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.max_prompt, args.max_new, args.max_seqs, args.max_tokens = 7, 13, 6, 4, 16
        args.chunk, args.page_size, args.num_pages, args.features = 5, 4, 13, 32
    args.pages_per_seq = -(-(args.max_prompt + args.max_new) // args.page_size)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Serves the stream, checks it against one-at-a-time contiguous decoding, prints the figures."""
    args = parse(argv)
    model = TinyLM(args.vocab, args.features, heads=4, kv_heads=2, layers=2, rngs=nnx.Rngs(args.seed))
    requests = make_requests(args)
    result = serve(model, requests, args)
    result["matches"] = {r.name: r.generated == decode_alone(model, r, args) for r in requests}
    print(
        f"{len(requests)} requests (prompts {min(len(r.prompt) for r in requests)}-"
        f"{max(len(r.prompt) for r in requests)} tokens), {result['generated']} tokens generated in "
        f"{result['steps']} steps: {result['tokens_per_s']:.0f} tokens/s generated, "
        f"{result['processed_per_s']:.0f} tokens/s through the model with the prompts "
        f"(first step, compiling: {result['compile_s']:.1f} s)"
    )
    print(f"up to {result['peak']} requests in one step; {result['page_waits']} requests waited for free pages")
    print(f"compiled step functions: {result['compilations']} (requests came and went, no recompilation)")
    same = sum(result["matches"].values())
    print(f"greedy tokens equal to decoding each request alone with the contiguous KV cache: {same}/{len(requests)}")
    return result


if __name__ == "__main__":
    main()
