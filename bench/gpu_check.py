"""The prepared GPU check: the serving executor on a CUDA card, predicted against measured, next to
plain torch (gpt-fast style) on the same card.

    bash bench/gpu_check.sh                 # after `bash scripts/setup.sh`; ~3-5 minutes on one card
    bash bench/gpu_check.sh --cpu-dry-run   # the same code paths on this CPU, small (the suite runs it)

Without a CUDA device it prints "skipped: no CUDA device" and exits 0. On a card:
1. The card measured on the spot (streaming read bandwidth, bf16 matmul rate, memory) and written
   into each plan's `device gpu0 gpu { ... }`, so predictions are for this card.
2. The real SmolLM2-135M through `lwdsl apply` -> `lwdsl run` -> `lwdsl check --json` in bf16, int8
   and int4 (each plan allows that one weight format; bf16 KV cache): predicted vs measured memory,
   time to first token and token latency, and the token's share of the bandwidth bound (weights + the
   KV cache read once a step, at the measured read rate).
3. The biggest catalog model whose bf16 weights take at most 45% of the card, built on the card with
   random weights (speed and memory only), in bf16, int8 and int4 g128 through the same executor
   (`lwdsl.runtime.serve`), against `lwdsl estimate` for the same settings.
4. Plain torch: a minimal bf16 Llama decode written here (static cache, SDPA, the step captured as one
   CUDA graph) on the same weights, for the same prompt, as the peer figure.
Exit 0 when everything ran (the figures are for reading, not a gate), 1 when a step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TEXT = "The capital of France is"
FORMATS = {  # plan technique, `estimate --with` value
    "bf16": ("quantize weights bf16", "bf16"),
    "int8": ("quantize weights int8", "int8"),
    "int4": ("quantize weights int4 group 64", "int4 group 64"),
}
BIG_FORMATS = {"bf16": "bf16", "int8": "int8", "int4": "int4 group 128"}


# --- the card ---------------------------------------------------------------------------------------

def measure_card(device: torch.device, dry: bool) -> dict:
    """Streaming read (a sum over a large tensor), bf16 matmul rate, memory, on `device`."""
    size = (1 << 22) if dry else (1 << 30)  # elements of bf16: 8 MiB / 2 GiB
    data = torch.ones(size, dtype=torch.bfloat16, device=device)
    n = 256 if dry else 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)

    def timed(work, repeats: int) -> float:
        work()
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        sync(device)
        return (time.perf_counter() - started) / repeats

    read_s = timed(lambda: data.sum(), 3 if dry else 20)
    matmul_s = timed(lambda: a @ a, 2 if dry else 10)
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 8 << 30
    card = {"name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
            "memory_bytes": memory, "read_Bps": data.numel() * 2 / read_s, "bf16_flops": 2 * n ** 3 / matmul_s}
    del data, a
    return card


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_block(card: dict, kind: str) -> str:
    return (f"device gpu0 {kind} {{ memory {card['memory_bytes'] / 2 ** 20:.0f} MiB; "
            f"bandwidth {card['read_Bps'] / 1e6:.0f} MB/s; compute {card['bf16_flops'] / 1e9:.1f} GFLOPS }}")


# --- SmolLM2 through the commands -------------------------------------------------------------------

def smollm2_plan(gguf: Path, technique: str, card: dict, kind: str, context: int, generate: int) -> str:
    return f"""plan gpu_check {{
  model "gguf:{gguf}" {{
    eval "text:python-docs" tokens 1024
    calibrate "text:python-docs" tokens 256
  }}
  target {{
    {device_block(card, kind)}
  }}
  workload inference {{ batch 1; context {context}; generate {generate} }}
  require {{ quality perplexity <= +50% }}
  allow {{
    {technique}
    quantize kv bf16
    keep lm_head, "model.embed_tokens"
  }}
  minimize memory then latency token
}}
"""


def lwdsl(*args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lwdsl", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    if done.returncode not in (0, 1):  # 1: a requirement not met, still a full report
        raise RuntimeError(f"lwdsl {args[0]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


def kv_read_bytes(layers: int, kv_heads: int, head_dim: int, positions: float, batch: int = 1) -> float:
    """bf16 keys and values a decode step reads at the mean position."""
    return 2 * layers * kv_heads * head_dim * 2 * positions * batch


def smollm2_rows(card: dict, kind: str, work: Path, env: dict, dry: bool, formats: list[str]) -> list[dict]:
    from lwdsl.models.fetch import fetch_smollm2

    gguf = fetch_smollm2(ROOT / "models")
    context, generate = (64, 8) if dry else (512, 64)
    rows = []
    for name in formats:
        technique = FORMATS[name][0]
        plan = work / f"smollm2_{name}.lwp"
        plan.write_text(smollm2_plan(gguf, technique, card, kind, context, generate))
        artifact = work / f"smollm2_{name}"
        lwdsl("apply", str(plan), "-o", str(artifact), env=env)
        text = lwdsl("run", str(artifact), "--prompt", PROMPT_TEXT, "--max-new-tokens", "8", env=env).stdout.strip()
        report = json.loads(lwdsl("check", str(plan), "--artifact", str(artifact), "--json", "--repeats",
                                  "1" if dry else "3", "--eval-tokens", "128" if dry else "1024",
                                  "--no-baseline-speed", env=env).stdout)
        predictions = {p["metric"]: p for p in report["predictions"]}
        manifest = json.loads((artifact / "manifest.json").read_text())
        weights = manifest["resident_bytes"]
        config = json.loads((artifact / "config.json").read_text())
        kv = kv_read_bytes(config["num_hidden_layers"], config["num_key_value_heads"],
                           config["hidden_size"] // config["num_attention_heads"], context + generate / 2)
        measured = report["measured"]
        rows.append({"model": "SmolLM2-135M", "format": name, "text": text[:40],
                     "memory": (predictions.get("memory gpu0", {}).get("predicted"), measured["memory_total_bytes"]),
                     "ttft": (predictions.get("latency prefill", {}).get("predicted"), measured["prefill_s"]),
                     "token": (predictions.get("latency token", {}).get("predicted"), measured["token_s"]),
                     "bound_share": (weights + kv) / card["read_Bps"] / measured["token_s"],
                     "step": measured.get("decode_step"), "perplexity_increase": measured.get("perplexity_increase")})
    return rows


# --- the biggest catalog model, random weights --------------------------------------------------------

def biggest_arch(card: dict, dry: bool) -> str:
    from lwdsl.inventory.sources import _catalog

    if dry:
        return "smollm2-135m"
    fits = [(entry["params"], arch_id) for arch_id, entry in _catalog().items()
            if arch_id != "_about" and entry["config"]["model_type"] in ("llama", "mistral", "qwen2")
            and 2 * entry["params"] <= 0.45 * card["memory_bytes"]]
    return max(fits)[1]


def random_model(arch_id: str, device: torch.device, dry: bool):
    """The catalog config's model on `device`, bf16, random weights (norms one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lwdsl.inventory.sources import _catalog

    values = dict(_catalog()[arch_id]["config"])
    if dry:
        values["num_hidden_layers"] = 2
    config = AutoConfig.for_model(**values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)  # to_empty left it blank
    return model.eval()


def quantized_copy_in_place(model, fmt_text: str) -> None:
    """Every block linear stored in `fmt_text` (codes made on the card, stored layout); a layer whose
    input width the group does not divide stays bf16, as `lwdsl estimate` leaves it."""
    from lwdsl.apply.kernels import quantize_linear_codes
    from lwdsl.apply.quantize import QuantizedLinear
    from lwdsl.estimate import parse_format

    fmt = parse_format(fmt_text)
    bits = {"int8": 8, "int4": 4}[fmt.dtype]
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, module in list(owner.named_children()):
                if isinstance(module, torch.nn.Linear) and module.in_features % (fmt.group or 1) == 0:
                    packed = quantize_linear_codes(module.weight.detach().float(), bits, fmt.group, fmt.symmetric)
                    setattr(owner, name, QuantizedLinear(packed, module.out_features, fmt, module.bias,
                                                         kernel="dequant_fp32"))
                    del module


def estimate(arch_id: str, card: dict, kind: str, fmt: str, context: int, generate: int, work: Path,
             env: dict) -> dict:
    plan = work / f"big_{fmt.split()[0]}.lwp"
    plan.write_text(f"""plan big {{
  model "arch:{arch_id}"
  target {{ {device_block(card, kind)} }}
  workload inference {{ batch 1; context {context}; generate {generate} }}
  allow {{ keep lm_head, "model.embed_tokens" }}
}}
""")
    done = lwdsl("estimate", str(plan), "--json", "--with", f"weights={fmt}", "--with", "kv=bf16", env=env)
    return json.loads(done.stdout)


def big_rows(card: dict, kind: str, device: torch.device, work: Path, env: dict, dry: bool) -> tuple[list, str]:
    from lwdsl.runtime.generate import decode

    arch_id = biggest_arch(card, dry)
    context, generate = (64, 8) if dry else (1024, 64)
    prompt = torch.randint(100, 20000, (1, context))
    rows = []
    for name, fmt in BIG_FORMATS.items():
        model = random_model(arch_id, device, dry)
        if name != "bf16":
            quantized_copy_in_place(model, fmt)
        from lwdsl.runtime.serve.executor import ACTIVATION, convert
        convert(model, device, ACTIVATION.get(device.type, torch.float32))
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        decode(model, prompt, generate, kv_format=None, stop_at_eos=False)  # warm-up: captures the graph
        runs = [decode(model, prompt, generate, stop_at_eos=False) for _ in range(1 if dry else 3)]
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        token_s = sorted(sorted(r.token_s)[len(r.token_s) // 2] for r in runs)[len(runs) // 2]
        ttft = sorted(r.prefill_s for r in runs)[len(runs) // 2]
        config = model.config
        kv = 4 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) \
            * (context + generate / 2)  # keys and values, bf16 (the executor keeps the cache in its activation dtype)
        predicted = estimate(arch_id, card, kind, fmt, context, generate, work, env)
        rows.append({"model": f"{arch_id} (random)", "format": name,
                     "memory": (predicted["memory"]["total_bytes"], peak),
                     "ttft": (predicted["latency"]["prefill_s"], ttft),
                     "token": (predicted["latency"]["token_s"], token_s),
                     "bound_share": (weights + kv) / card["read_Bps"] / token_s, "step": runs[0].step})
        del model, runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, arch_id


# --- plain torch, gpt-fast style ---------------------------------------------------------------------

class PlainLlama:
    """A bf16 Llama decode with nothing of lwdsl: weights as tensors, a static cache, SDPA, and the
    decode step captured once as a CUDA graph (eager on a CPU)."""

    def __init__(self, model, max_len: int, device: torch.device):
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        take = lambda t: t.detach().to(device=device, dtype=torch.bfloat16)  # noqa: E731
        inner = model.model
        self.embed, self.final_norm = take(inner.embed_tokens.weight), take(inner.norm.weight)
        self.head = take(model.lm_head.weight)
        self.blocks = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.blocks.append({
                "qkv": torch.cat([take(attn.q_proj.weight), take(attn.k_proj.weight), take(attn.v_proj.weight)]),
                "o": take(attn.o_proj.weight), "gate_up": torch.cat([take(mlp.gate_proj.weight), take(mlp.up_proj.weight)]),
                "down": take(mlp.down_proj.weight), "norm1": take(layer.input_layernorm.weight),
                "norm2": take(layer.post_attention_layernorm.weight)})
        self.k = [torch.zeros(1, self.kv_heads, max_len, self.dim, dtype=torch.bfloat16, device=device) for _ in self.blocks]
        self.v = [torch.zeros_like(k) for k in self.k]
        # the model's own rotary table (its rope scaling included), [max_len, dim], halves repeated
        positions = torch.arange(max_len, device=device)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, device=device), positions)
        self.cos, self.sin = cos[0].float(), sin[0].float()
        self.device, self.max_len, self.graph = device, max_len, None

    def _rope(self, x, pos):
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

    def _norm(self, x, weight):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * weight

    def forward(self, ids, pos):
        """ids [1, n] at positions `pos` (a device tensor [n]); logits of the last position."""
        n = ids.shape[1]
        x = F.embedding(ids, self.embed)
        mask = torch.arange(self.max_len, device=self.device)[None] <= pos[:, None]
        q_size, kv_size = self.heads * self.dim, self.kv_heads * self.dim
        for i, b in enumerate(self.blocks):
            h = self._norm(x, b["norm1"])
            q, k, v = (h @ b["qkv"].t()).split([q_size, kv_size, kv_size], dim=-1)
            q = self._rope(q.view(1, n, self.heads, self.dim).transpose(1, 2), pos)
            k = self._rope(k.view(1, n, self.kv_heads, self.dim).transpose(1, 2), pos)
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v.view(1, n, self.kv_heads, self.dim).transpose(1, 2))
            keys = self.k[i].repeat_interleave(self.heads // self.kv_heads, 1)
            values = self.v[i].repeat_interleave(self.heads // self.kv_heads, 1)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + y.transpose(1, 2).reshape(1, n, q_size) @ b["o"].t()
            gate, up = (self._norm(x, b["norm2"]) @ b["gate_up"].t()).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ b["down"].t()
        return (self._norm(x[:, -1], self.final_norm) @ self.head.t()).float()

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.forward(token, torch.tensor([position], device=self.device))
        if self.graph is None:
            self.static = (token.clone(), torch.tensor([position], device=self.device))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.forward(*self.static)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.forward(*self.static)
        self.static[0].copy_(token)
        self.static[1].fill_(position)
        self.graph.replay()
        return self.out


@torch.inference_mode()
def plain_torch(model, prompt: torch.Tensor, generate: int, device: torch.device) -> tuple[float, float]:
    """(time to first token, median token latency) of `PlainLlama` on the prompt, greedy."""
    plain = PlainLlama(model, prompt.shape[1] + generate, device)
    prompt = prompt.to(device)
    timings = []
    for _ in range(2):  # the first run captures the graph
        sync(device)
        started = time.perf_counter()
        token = plain.forward(prompt, torch.arange(prompt.shape[1], device=device)).argmax(-1, keepdim=True)
        token.cpu()
        ttft, steps = time.perf_counter() - started, []
        for position in range(prompt.shape[1], prompt.shape[1] + generate - 1):
            started = time.perf_counter()
            token = plain.step(token, position).argmax(-1, keepdim=True)
            token.cpu()
            steps.append(time.perf_counter() - started)
        timings.append((ttft, sorted(steps)[len(steps) // 2]))
    return timings[-1]


# --- report ------------------------------------------------------------------------------------------

def _pair(pair, unit: str) -> str:
    predicted, measured = pair
    scale = {"MiB": 2 ** 20, "ms": 1e-3}[unit]
    show = lambda v: "-" if v is None else f"{v / scale:.1f}"  # noqa: E731
    ratio = f" ({measured / predicted:.2f}x)" if predicted and measured else ""
    return f"{show(predicted)} / {show(measured)} {unit}{ratio}"


def print_rows(rows: list[dict]) -> None:
    print(f"{'model':28} {'fmt':5} {'memory pred/meas':28} {'TTFT pred/meas':26} {'token pred/meas':26} "
          f"{'bound':6} step")
    for r in rows:
        print(f"{r['model']:28} {r['format']:5} {_pair(r['memory'], 'MiB'):28} {_pair(r['ttft'], 'ms'):26} "
              f"{_pair(r['token'], 'ms'):26} {r['bound_share']:6.0%} {r.get('step', '')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every step on this CPU, small")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--formats", default="bf16,int8,int4", help="SmolLM2's weight formats (bf16,int8,int4)")
    args = parser.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    started = time.perf_counter()
    device = torch.device("cpu" if dry else "cuda:0")
    kind = "cpu" if dry else "gpu"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if dry:
        env["LWDSL_EXECUTOR"] = "serve"  # the serving executor on the CPU, as on a card
        os.environ["LWDSL_EXECUTOR"] = "serve"
    card = measure_card(device, dry)
    print(f"card: {card['name']}, {card['memory_bytes'] / 2 ** 30:.1f} GiB, read {card['read_Bps'] / 1e9:.0f} GB/s, "
          f"bf16 matmul {card['bf16_flops'] / 1e12:.1f} TFLOP/s; torch {torch.__version__}")
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="lwdsl-gpu-check-") as folder:
        work = Path(folder)
        if not args.skip_smollm2:
            try:
                rows += smollm2_rows(card, kind, work, env, dry, args.formats.split(","))
                print(f"[{time.perf_counter() - started:.0f} s] SmolLM2 {args.formats} applied, run and checked")
            except Exception:  # noqa: BLE001 - report it and go on to the next step
                print("SmolLM2 step failed:")
                traceback.print_exc()
                failed = True
        if not args.skip_big:
            try:
                big, arch_id = big_rows(card, kind, device, work, env, dry)
                rows += big
                model = random_model(arch_id, device, dry)
                context, generate = (64, 8) if dry else (1024, 64)
                ttft, token = plain_torch(model, torch.randint(100, 20000, (1, context)), generate, device)
                weights = sum(p.numel() * 2 for p in model.parameters())
                rows.append({"model": f"{arch_id} (random)", "format": "bf16", "memory": (None, None),
                             "ttft": (None, ttft), "token": (None, token),
                             "bound_share": weights / card["read_Bps"] / token,
                             "step": "plain torch (gpt-fast style: static cache, SDPA, one CUDA graph a step)"})
                del model
                print(f"[{time.perf_counter() - started:.0f} s] {arch_id} with random weights measured, "
                      f"plain torch beside it")
            except Exception:  # noqa: BLE001
                print("big-model step failed:")
                traceback.print_exc()
                failed = True
    print_rows(rows)
    print(f"total {time.perf_counter() - started:.0f} s; 'bound': the weights and KV cache a token reads at the "
          f"measured read rate, over the measured token latency")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
