"""How long a prefill chunk is, and how many positions the static cache holds (no torch here: the
cost model can price exactly these numbers).

A prompt is prefilled in chunks of `prefill_chunk_tokens(...)` positions; a chunk's transient
activations take at most `PREFILL_WORKSPACE_BYTES`:

- per chunk token: the hidden state, its norm, the attention output and the residual sum (4 x hidden),
  q/k/v (heads + 2 x kv_heads head vectors) and the MLP's gate, up and product (3 x intermediate), in
  the activation dtype, for every sequence of the batch; plus one mask byte per cached position;
- once per chunk: keys and values expanded from the kv heads to the query heads over the cached
  positions (grouped-query attention through the memory-efficient SDPA kernel), 2 x heads x head_dim
  values a position, per sequence.

A chunk is a multiple of 64 positions, at least 64, at most the prompt.

    prefill_chunk_tokens(8192, batch=1, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                         intermediate=14336, activation_bytes=2, cache_tokens=8704)   # -> 6656
"""
from __future__ import annotations

PREFILL_WORKSPACE_BYTES = 1 << 30  # 1 GiB of transient activations a chunk
CHUNK_MULTIPLE = 64
CACHE_MULTIPLE = 64  # the static cache's positions are rounded up to this (the chunk multiple: a
# coarser one cost a batch-60 request 4 GB of positions it never writes)


def cache_tokens(tokens: int) -> int:
    """Positions the static cache holds for `tokens` (context + generate), rounded up."""
    return -(-max(1, tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE


def chunk_token_bytes(batch: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                      activation_bytes: int, cache_tokens: int) -> int:
    """Transient bytes each position of a prefill chunk adds."""
    values = 4 * hidden + (heads + 2 * kv_heads) * head_dim + 3 * intermediate
    return batch * values * activation_bytes + cache_tokens


def expanded_kv_bytes(batch: int, heads: int, head_dim: int, activation_bytes: int, cache_tokens: int) -> int:
    """Keys and values expanded to every query head over the cached positions (one layer at a time)."""
    return 2 * batch * heads * head_dim * activation_bytes * cache_tokens


def prefill_chunk_tokens(prompt_tokens: int, batch: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                         intermediate: int, activation_bytes: int, cache_tokens: int,
                         workspace_bytes: int = PREFILL_WORKSPACE_BYTES) -> int:
    """Positions a prefill chunk covers (see the module text)."""
    left = workspace_bytes - expanded_kv_bytes(batch, heads, head_dim, activation_bytes, cache_tokens)
    per_token = chunk_token_bytes(batch, hidden, heads, kv_heads, head_dim, intermediate, activation_bytes,
                                  cache_tokens)
    fits = max(CHUNK_MULTIPLE, left // per_token // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
    return max(1, min(prompt_tokens, fits))
