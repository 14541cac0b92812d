"""A lean decode loop: one prefill, then one token at a time into a static KV cache.

For Llama-family models (SmolLM2, Llama, Mistral, Qwen2 layouts) and Gemma 3 the forward is written here over the
model's own submodules, so quantized, pruned, offloaded or sharded linears run unchanged (they are
called as modules, hooks included) while the per-token Python overhead of the Hugging Face `generate`
machinery (masks, cache objects, logits processors) is gone. Head counts are read from the live
projection sizes, so pruned heads and tensor-parallel shards need nothing special. Other
architectures fall back to the Hugging Face forward with its own cache.

    text = generate(model, tokenizer, "The capital of France is", max_new_tokens=16)
    run = decode(model, input_ids, max_new_tokens=64)   # ids, prefill_s, token_s
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lwdsl.apply.kv import kv_cache_for
from lwdsl.apply.native import prefill_attention
from lwdsl.runtime import heap
from lwdsl.runtime.fused import Fused, describe
from lwdsl.solution import QuantFormat

LEAN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma3_text"})
LAST_ROW_MODEL_TYPES = LEAN_MODEL_TYPES  # `lwdsl.cost.terms.LAST_ROW_MODEL_TYPES`


@dataclass
class Decoded:
    """What one decode produced and how long each phase took (seconds)."""

    token_ids: list[int]  # the new tokens only
    prefill_s: float  # prompt forward + the first token's choice
    token_s: list[float] = field(default_factory=list)  # each later token's forward + choice
    token_cpu_s: list[float] = field(default_factory=list)  # the same steps in process CPU time
    kv_cache_bytes: int = 0
    step: str = ""  # how decode steps ran: "fused", or "eager: <why not fused>"

    @property
    def ms_per_token(self) -> float:
        """Median wall-clock milliseconds of a decode step."""
        return 1e3 * _median(self.token_s)

    @property
    def cpu_ms_per_token(self) -> float:
        """Median process-CPU milliseconds of a decode step (all threads; on a shared machine
        this shows the work a step costs, apart from the time the process waited for a core)."""
        return 1e3 * _median(self.token_cpu_s)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


class LeanLlama:
    """The decode-time forward of a Llama-layout causal LM over its existing modules (Gemma 3's block,
    four norms and q/k head norms, is `LeanGemma`'s)."""

    def __init__(self, model, max_len: int, kv_format: QuantFormat | None = None):
        heap.prime()  # a prefill's transients from reused heap, not fresh pages (`lwdsl.runtime.heap`)
        config = model.config
        self.model, self.inner = model, model.model
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = list(self.inner.layers)
        # per layer: head pruning may leave blocks with different kv-head counts
        kv_heads = [layer.self_attn.k_proj.out_features // self.head_dim for layer in self.layers]
        self.max_len = max_len
        self.cache = kv_cache_for(kv_format, layers=len(self.layers), batch=1, kv_heads=kv_heads,
                                  max_len=max_len, head_dim=self.head_dim, dtype=torch.float32,
                                  windows=self.windows)
        self.tables = self._rotary_tables(max_len)  # kind -> (cos, sin) [max_len, head_dim]
        self.cos, self.sin = self.tables[self.kinds[0]]
        self._place(model.__dict__.get("lwdsl_placement"))
        # Decode steps run fused in native code when every module is one it computes (else: why not).
        self.fused: Fused | str = "disabled by LWDSL_FUSED=0" if os.environ.get("LWDSL_FUSED") == "0" \
            else self.pipelined or describe(model, self.cache, self.tables, self.kinds, max_len, self.head_dim)

    @property
    def kinds(self) -> list:
        """Each block's rotary table (one for every block of a Llama layout)."""
        return [None] * len(self.layers)

    @property
    def windows(self) -> list[int | None]:
        """Each block's sliding window (None: it attends to every earlier position)."""
        return [None] * len(self.layers)

    def _rotary_tables(self, max_len: int) -> dict:
        positions = torch.arange(max_len)[None]
        cos, sin = self.inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        return {None: (cos[0], sin[0])}

    def _place(self, placement) -> None:
        """A placed model (`lwdsl.placement.Placement`): each block's KV cache and rotary table on its
        device, the hidden state moved where the device changes (this loop calls modules directly, so
        the blocks' placement hooks never run). Unplaced: nothing moves."""
        self.io, self.moves, self.back, self.pipelined = None, [None] * len(self.layers), None, ""
        self.rotary = {None: self.tables}
        if placement is None:
            return
        self.io = placement.io
        self.rotary = {d: {kind: (cos.to(d), sin.to(d)) for kind, (cos, sin) in self.tables.items()}
                       for d in placement.devices}
        previous = placement.io
        for index, device in enumerate(placement.blocks):
            parts = (self.cache.keys, self.cache.values) if hasattr(self.cache, "keys") else \
                (*self.cache.codes, *self.cache.scales)
            for per_layer in parts:
                per_layer[index] = per_layer[index].to(device)
            self.moves[index] = device if device != previous else None
            previous = device
        self.back = placement.io if previous != placement.io else None
        if placement.pipelined:
            self.pipelined = (f"pipelined over {', '.join(placement.devices)} (the fused step runs the whole "
                              f"model on one CPU device)")

    @staticmethod
    def _rms_norm(norm, x):
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
        return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attend(self, index: int, attn, q, k, v, start: int) -> torch.Tensor:
        """Attention of block `index` for queries at `start...`, this call's keys/values stored first."""
        keys, values = self.cache.update(index, start, k, v)
        if q.shape[2] > 1:
            return prefill_attention(q, keys, values)
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=keys.shape[1] != q.shape[1])

    def _block(self, index: int, layer, hidden, cos, sin, start: int):
        batch, length = hidden.shape[:2]
        attn = layer.self_attn
        normed = self._rms_norm(layer.input_layernorm, hidden)
        q = attn.q_proj(normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        out = self._attend(index, attn, q, k, v, start)
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        normed = self._rms_norm(layer.post_attention_layernorm, hidden)
        mlp = layer.mlp
        return hidden + mlp.down_proj(F.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed))

    def _logits(self, last):
        return self.model.lm_head(self._rms_norm(self.inner.norm, last))

    def forward(self, input_ids: torch.Tensor, start: int, every_position: bool = False) -> torch.Tensor:
        """Logits of the last position for `input_ids` placed at positions `start...` ([batch, vocab]);
        with `every_position`, of each position ([batch, length, vocab]: a perplexity measured through
        this prefill's own numerics)."""
        batch, length = input_ids.shape
        if length == 1 and batch == 1 and isinstance(self.fused, Fused) and not every_position:
            return self.fused.step(self.inner.embed_tokens(input_ids), start)
        rotary = {d: {kind: (cos[start:start + length], sin[start:start + length])
                      for kind, (cos, sin) in tables.items()} for d, tables in self.rotary.items()}
        tables = rotary[self.io]
        hidden = self.inner.embed_tokens(input_ids if self.io is None else input_ids.to(self.io))
        for index, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
            if self.moves[index] is not None:
                hidden = hidden.to(self.moves[index])
                tables = rotary[self.moves[index]]
            hidden = self._block(index, layer, hidden, *tables[kind], start)
        last = hidden if every_position else hidden[:, -1:]
        last = last if self.back is None else last.to(self.back)
        logits = self._logits(last)
        return logits if every_position else logits[:, -1]


class LeanGemma(LeanLlama):
    """Gemma 3's decode-time forward: the Llama loop with its block (q/k head norms; the attention's
    and the MLP's outputs normed before the residual add; GELU), norms that scale by (1 + w), a rotary
    table per layer type (local / global) and sliding-window layers whose cache is the window (a ring:
    `lwdsl.apply.kv.FloatKVCache`). The embedding module scales by sqrt(hidden) itself."""

    @property
    def kinds(self) -> list:
        return [layer.self_attn.layer_type for layer in self.layers]

    @property
    def windows(self) -> list[int | None]:
        return [layer.self_attn.sliding_window for layer in self.layers]

    def _rotary_tables(self, max_len: int) -> dict:
        positions, probe = torch.arange(max_len)[None], torch.zeros(1, dtype=torch.float32)
        tables = {}
        for kind in set(self.kinds):
            cos, sin = self.inner.rotary_emb(probe, positions, kind)
            tables[kind] = (cos[0], sin[0])
        return tables

    @staticmethod
    def _rms_norm(norm, x):
        weight = norm.__dict__.get("lwdsl_plus_one")
        if weight is None or weight.device != norm.weight.device:  # (1 + w), once: Gemma's norms scale by it
            weight = norm.__dict__["lwdsl_plus_one"] = (1.0 + norm.weight.float()).detach()
        return F.rms_norm(x, (x.shape[-1],), weight, norm.eps)

    def _attend(self, index: int, attn, q, k, v, start: int) -> torch.Tensor:
        keys, values = self.cache.update(index, start, k, v)
        dtype = None if q.shape[2] > 1 else q.dtype  # one row: float32, as the Llama loop's
        return prefill_attention(q, keys, values, dtype, scale=attn.scaling, window=self.windows[index])

    def _block(self, index: int, layer, hidden, cos, sin, start: int):
        batch, length = hidden.shape[:2]
        attn, mlp = layer.self_attn, layer.mlp
        normed = self._rms_norm(layer.input_layernorm, hidden)
        q = attn.q_proj(normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q = self._rotate(self._rms_norm(attn.q_norm, q), cos, sin)
        k = self._rotate(self._rms_norm(attn.k_norm, k), cos, sin)
        out = attn.o_proj(self._attend(index, attn, q, k, v, start).transpose(1, 2).reshape(batch, length, -1))
        hidden = hidden + self._rms_norm(layer.post_attention_layernorm, out)
        normed = self._rms_norm(layer.pre_feedforward_layernorm, hidden)
        out = mlp.down_proj(F.gelu(mlp.gate_proj(normed), approximate="tanh") * mlp.up_proj(normed))
        return hidden + self._rms_norm(layer.post_feedforward_layernorm, out)

    def _logits(self, last):
        logits = super()._logits(last)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


class HFStep:
    """Fallback: the Hugging Face forward with its own cache, one call per step."""

    def __init__(self, model, max_len: int, kv_format: QuantFormat | None = None):
        heap.prime()
        if kv_format is not None and kv_format.dtype != "fp32":
            from lwdsl.errors import fail
            raise fail("E606", f"KV format {kv_format.dtype} needs the lean decode path (Llama layouts)")
        self.model, self.past = model, None
        self.cache = None
        # the head for the last position only where the cost model counts it so (a 262k vocabulary's
        # head over every prompt token would be most of a prefill)
        last_row = getattr(model.config, "model_type", "") in LAST_ROW_MODEL_TYPES
        self.extra = {"logits_to_keep": 1} if last_row else {}
        self.fused = _unfused_reason(model)

    def forward(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        out = self.model(input_ids=input_ids, past_key_values=self.past, use_cache=True, **self.extra)
        self.past = out.past_key_values
        return out.logits[:, -1]


# Why a layout runs the Hugging Face forward instead of the fused step (what `check` prints).
UNFUSED_LAYOUTS = {
    "gpt2": "GPT-2 layout (LayerNorm, fused c_attn, learned positions): the fused step computes Llama layouts only",
}


def _unfused_reason(model) -> str:
    model_type = getattr(model.config, "model_type", "")
    return UNFUSED_LAYOUTS.get(model_type, f"the Hugging Face forward ({model_type or 'unknown'} is not a Llama layout)")


def _runner(model, max_len: int, kv_format: QuantFormat | None):
    from lwdsl.runtime import serve

    if serve.serves(model):  # on a CUDA device: the serving executor (`lwdsl.runtime.serve`)
        return serve.runner(model, 1, max_len, kv_format)
    lean = getattr(model.config, "model_type", "") in LEAN_MODEL_TYPES and hasattr(model, "model")
    if not lean:
        return HFStep(model, max_len, kv_format)
    return (LeanGemma if model.config.model_type == "gemma3_text" else LeanLlama)(model, max_len, kv_format)


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:  # max's indices: the first largest, as argmax's, in a third of its time on a CPU
        return int(logits.max(-1).indices[0])  # (262k logits: 0.10 vs 0.33 ms, a step's 1%)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)[0, 0])


def decode(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
           eos_token_id: int | None = None, kv_format: QuantFormat | None = None, seed: int = 0,
           stop_at_eos: bool = True) -> Decoded:
    """Prefill `input_ids` (shape [1, n]) once, then decode up to `max_new_tokens` tokens."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    length = input_ids.shape[1]
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    with torch.inference_mode():
        runner = _runner(model, length + max_new_tokens, kv_format)
        started = time.perf_counter()
        token = _choose(runner.forward(input_ids, 0), temperature, generator)
        result = Decoded([token], time.perf_counter() - started)
        position = length
        while len(result.token_ids) < max_new_tokens:
            if stop_at_eos and eos_token_id is not None and token == eos_token_id:
                break
            started, started_cpu = time.perf_counter(), time.process_time()
            logits = runner.forward(torch.tensor([[token]]), position)
            token = _choose(logits, temperature, generator)
            result.token_s.append(time.perf_counter() - started)
            result.token_cpu_s.append(time.process_time() - started_cpu)
            result.token_ids.append(token)
            position += 1
        if runner.cache is not None:
            result.kv_cache_bytes = runner.cache.kv_cache_bytes()
        fused = getattr(runner, "fused", "the Hugging Face forward (not a Llama layout)")
        result.step = "fused" if isinstance(fused, Fused) else getattr(runner, "step", None) or f"eager: {fused}"
    return result


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             kv_format: QuantFormat | None = None, seed: int = 0, chat: bool = False) -> str:
    """The text `model` continues `prompt` with (greedy when `temperature` is 0).

    `chat=True` wraps the prompt in the tokenizer's chat template as a user turn.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    result = decode(model, input_ids, max_new_tokens, temperature, tokenizer.eos_token_id, kv_format, seed)
    ids = result.token_ids
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)
