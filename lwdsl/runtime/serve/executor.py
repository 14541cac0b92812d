"""The serving executor's forward: a Llama-layout model over a static KV cache, prefill in chunks,
each decode step one CUDA graph replay on CUDA (eager elsewhere).

`Serve(model, batch, tokens, kv_format)` converts the model's linear layers in place to their serving
kernels (`linears.serve_linear`, once), preallocates the cache for `batch` x `cache_tokens(tokens)`
positions and precomputes the rotary table. `forward(ids, start)` is the decode loop's runner
interface (`lwdsl.runtime.generate`): ids `[batch, n]` placed at positions `start...`, logits of the
last position `[batch, vocab]` in float32.

- Attention is `F.scaled_dot_product_attention`, never a score matrix in memory. Prefill: the chunk's
  queries against the cached keys so far, kv heads expanded to the query heads; the first chunk is
  plain causal (flash), later ones carry a boolean mask `[chunk, cached]`. Decode: each kv head's
  query group folded into the query length (`[batch, kv_heads, group, head_dim]`), so the cache is
  read once and not expanded; a boolean mask hides the positions not yet written.
- Decode step on CUDA: captured once per cache as a `torch.cuda.CUDAGraph` over static input
  buffers (token ids, position); a replay is one launch. Where capture fails (a collective that
  cannot be captured), the step runs eagerly and `step` says why.
- Norms (RMS) and rotary embeddings are computed in float32 and cast to the activation dtype (bf16 on
  CUDA, float32 on a CPU); each linear computes in its stored format (`linears`).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lwdsl.runtime.serve import chunk as chunks
from lwdsl.runtime.serve.cache import static_cache
from lwdsl.runtime.serve.linears import serve_linear
from lwdsl.solution import QuantFormat

ACTIVATION = {"cuda": torch.bfloat16, "cpu": torch.float32}
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
               ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def convert(model, device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """Every projection and the head on its serving kernel, in place; returns a count per kernel."""
    counts: dict[str, int] = {}
    targets = [(layer, part, name) for layer in model.model.layers for part, name in PROJECTIONS]
    for layer, part, name in targets:
        owner = getattr(layer, part)
        setattr(owner, name, serve_linear(getattr(owner, name), device, dtype))
        kernel = getattr(getattr(owner, name), "kernel", "")
        counts[kernel] = counts.get(kernel, 0) + 1
    tied = model.lm_head.weight is model.model.embed_tokens.weight if hasattr(model.lm_head, "weight") else False
    model.lm_head = serve_linear(model.lm_head, device, dtype)
    if tied:  # the same tensor, not a copy
        model.model.embed_tokens.weight = model.lm_head.weight
    counts[model.lm_head.kernel] = counts.get(model.lm_head.kernel, 0) + 1
    return counts


class Serve:
    """The serving forward of one model for one cache shape (see the module text)."""

    def __init__(self, model, batch: int, tokens: int, kv_format: QuantFormat | None = None,
                 prefill_chunk: int | None = None, graphs: bool | None = None,
                 activation: torch.dtype | None = None):
        config = model.config
        self.model, self.inner = model, model.model
        self.device = model_device(model)
        self.dtype = activation or ACTIVATION.get(self.device.type, torch.float32)
        self.kernels = convert(model, self.device, self.dtype)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = list(self.inner.layers)
        kv_heads = [layer.self_attn.k_proj.out_features // self.head_dim for layer in self.layers]
        heads = [layer.self_attn.q_proj.out_features // self.head_dim for layer in self.layers]
        self.groups = [h // k for h, k in zip(heads, kv_heads)]
        self.batch, self.positions = batch, chunks.cache_tokens(tokens)
        self.cache = static_cache(kv_format, layers=len(self.layers), batch=batch, kv_heads=kv_heads,
                                  positions=self.positions, head_dim=self.head_dim, device=self.device,
                                  activation=self.dtype)
        self.scale = getattr(self.layers[0].self_attn, "scaling", self.head_dim ** -0.5)
        self.eps = [(self._eps(l.input_layernorm), self._eps(l.post_attention_layernorm)) for l in self.layers]
        table = torch.arange(self.positions, device=self.device)
        cos, sin = self.inner.rotary_emb(torch.zeros(1, device=self.device), table[None])
        self.cos, self.sin = cos[0].float(), sin[0].float()  # [positions, head_dim]
        self.position_index = table
        activation_bytes = torch.finfo(self.dtype).bits // 8
        self.chunk = prefill_chunk or int(os.environ.get("LWDSL_PREFILL_CHUNK", 0)) or \
            chunks.prefill_chunk_tokens(tokens, batch, config.hidden_size, max(heads), max(kv_heads),
                                        self.head_dim, max(l.mlp.gate_proj.out_features for l in self.layers),
                                        activation_bytes, self.positions)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.graph, self.static = None, None
        self.step = "graphed (one CUDA graph a step)" if self.graphs else \
            f"eager serving step on {self.device.type} (CUDA graphs need a CUDA device)"

    @staticmethod
    def _eps(norm) -> float:
        return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6))

    def _norm(self, norm, x: torch.Tensor, eps: float) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * norm.weight.float()).to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x32 = x.float()
        rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    # -- one forward over positions `positions` (a device tensor) ----------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int | None) -> torch.Tensor:
        """Logits of the last position. `start`: the first position of a prefill chunk (a Python int,
        it sets the shapes); None for a decode step (shapes fixed, the position only in `positions`)."""
        batch, length = ids.shape
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        hidden = self.inner.embed_tokens(ids).to(self.dtype)
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            eps_in, eps_post = self.eps[index]
            normed = self._norm(layer.input_layernorm, hidden, eps_in)
            q = attn.q_proj(normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.cache.write(index, positions, k, v)
            if start is None:
                out = self._attend_decode(index, q, positions)
            else:
                out = self._attend_prefill(index, q, k, v, positions, start)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            normed = self._norm(layer.post_attention_layernorm, hidden, eps_post)
            hidden = hidden + mlp.down_proj(F.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed))
        last = self._norm(self.inner.norm, hidden[:, -1:], self._eps(self.inner.norm))
        return self.model.lm_head(last)[:, -1].float()

    def _attend_prefill(self, index, q, k, v, positions, start):
        group, dtype = self.groups[index], self.cache.attention_dtype
        if start == 0:  # the chunk alone, causal: no mask, flash where the device has it
            keys, values = k.to(dtype), v.to(dtype)
            mask, causal = None, True
        else:
            keys, values = self.cache.read(index, start + q.shape[2])
            mask, causal = self.position_index[:start + q.shape[2]][None] <= positions[:, None], False
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q.to(dtype), keys, values, attn_mask=mask, is_causal=causal,
                                             scale=self.scale)
        return out.to(self.dtype)

    def _attend_decode(self, index, q, positions):
        batch, heads, _, dim = q.shape
        keys, values = self.cache.read(index)
        kv_heads = keys.shape[1]
        folded = q.reshape(batch, kv_heads, heads // kv_heads, dim)  # a kv head's query group as rows
        mask = (self.position_index <= positions[-1])[None, None, None]
        out = F.scaled_dot_product_attention(folded.to(keys.dtype), keys, values, attn_mask=mask, scale=self.scale)
        return out.reshape(batch, heads, 1, dim).to(self.dtype)

    # -- the runner interface ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        ids = input_ids.to(self.device)
        if ids.shape[0] != self.batch:
            raise ValueError(f"this executor was built for batch {self.batch}, got {ids.shape[0]}")
        length = ids.shape[1]
        if start + length > self.positions:
            raise ValueError(f"positions {start}..{start + length} exceed the cache's {self.positions}")
        if length == 1 and start > 0:
            return self._decode(ids, start)
        logits = None
        for first in range(0, length, self.chunk):
            piece = ids[:, first:first + self.chunk]
            positions = torch.arange(start + first, start + first + piece.shape[1], device=self.device)
            logits = self._forward(piece, positions, start + first)
        return logits

    def _decode(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        if not self.graphs:
            return self._forward(ids, torch.tensor([position], device=self.device), None)
        if self.graph is None:
            return self._capture(ids, position)
        static_ids, static_position, logits = self.static
        static_ids.copy_(ids)
        static_position.fill_(position)
        self.graph.replay()
        return logits.clone()

    def _capture(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Warm up on a side stream with the real inputs (a step is idempotent: the same keys written at
        the same position), then capture; the captured step is replayed once for the result."""
        static_ids = ids.clone()
        static_position = torch.tensor([position], device=self.device)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(static_ids, static_position, None)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward(static_ids, static_position, None)
        except RuntimeError as error:  # e.g. a collective its backend cannot capture
            self.graphs = False
            self.step = f"eager serving step (CUDA graph capture failed: {str(error).splitlines()[0][:120]})"
            return self._forward(ids, static_position, None)
        self.graph, self.static = graph, (static_ids, static_position, logits)
        graph.replay()
        return logits.clone()
