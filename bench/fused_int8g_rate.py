# PYTHONPATH=. .venv/bin/python bench/fused_int8g_rate.py
"""int8 per channel vs int8 g32 in the fused step: synthetic blocks (the probe's), interleaved rounds,
process CPU seconds per step (the machine is shared: CPU time is the work), 1 thread."""
import statistics, time, torch
from lwdsl.apply import native
from lwdsl.hardware.probe_native import _fused_model
torch.set_num_threads(1)
width = 576
models = {f: _fused_model(torch, native, f, 12, width, 1) for f in ("int8", "int8g")}
hidden, logits = torch.zeros(width), torch.empty(64 * 1024)
cpu = {f: [] for f in models}
for _ in range(7):
    for f, (described, keep, weights) in models.items():
        start = time.process_time()
        for _ in range(20):
            native.llama_step(described, hidden.clone(), 1, torch.empty(described.head.N))
        cpu[f].append((time.process_time() - start) / 20)
for f, (described, keep, weights) in models.items():
    s = statistics.median(cpu[f])
    print(f"{f}: {weights / 1e6:.1f} MB/step, median CPU {s * 1e3:.2f} ms/step, {weights / s / 1e9:.2f} GB/s")
