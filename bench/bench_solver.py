"""Solver benchmark: time to a proven optimum, and the solver against an Accelerate-style greedy.

    .venv/bin/python bench/bench_solver.py [--repeat 3] [--workers 1]

1. 70B-class (Llama-3.1-70B, 80 blocks): 6 weight formats (+ as loaded) x 3 prune levels x 3 places
   per block (GPU / host / NVMe), tensor sharding up to 8, 3 KV formats. Goal: <= 2 s to OPTIMAL.
2. 405B on 8 GPUs + host (plans/llama405b_8xh100.lwp). Goal: <= 10 s.
3. Offload-heavy plans: predicted token latency of the greedy baseline / the solver's (same cost
   model, same quality line; > 1 means the solver is faster).
Times are wall seconds of the solve alone (CP-SAT, all scenarios, read-back) and of the build
(inventory, hardware, cost terms); medians of --repeat runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lwdsl.hardware import resolve_target  # noqa: E402
from lwdsl.inventory import load_inventory  # noqa: E402
from lwdsl.plans import load_plan  # noqa: E402
from lwdsl.solve.greedy import greedy_predicted  # noqa: E402
from lwdsl.solve.search import solve_plan  # noqa: E402

GPUS = "\n".join(f'    device gpu{i} gpu "h100-sxm"' for i in range(8))
LINKS = "\n".join(f"    link gpu{i} <-> gpu{j} 450 GB/s latency 2 us" for i in range(8) for j in range(i + 1, 8))
HOST_LINKS = "\n".join(f"    link gpu{i} <-> host 55 GB/s latency 10 us\n    link gpu{i} <-> nvme 7 GB/s latency 20 us"
                       for i in range(8))

SEVENTY_B = f"""plan bench_70b {{
  model "arch:llama-3.1-70b"
  target {{
{GPUS}
    device host cpu {{ memory 1 TiB; bandwidth 200 GB/s; compute 4 TFLOPS }}
    device nvme disk {{ memory 8 TiB; bandwidth 7 GB/s }}
{LINKS}
{HOST_LINKS}
  }}
  workload inference {{ batch 4; context 2048; generate 256 }}
  require {{
    memory gpu0 <= 30 GB
    latency token <= 400 ms
    quality perplexity <= +4%
  }}
  allow {{
    quantize weights fp16, bf16, fp8, int8, int4 group 128, nf4 group 64
    quantize kv int8, fp8
    prune channels up to 20%
    shard tensor up to 8
    offload host, nvme
    keep lm_head
  }}
  minimize latency token then memory
}}
"""

ONE_CARD_70B = """plan offload_heavy_70b {
  model "arch:llama-3.1-70b"
  target {
    device gpu0 gpu "rtx-4090"
    device host cpu { memory 128 GiB; bandwidth 80 GB/s; compute 2 TFLOPS }
    link gpu0 <-> host 25 GB/s latency 10 us
  }
  workload inference { batch 1; context 1024; generate 128 }
  require { memory gpu0 <= 24 GiB; quality perplexity <= +5% }
  allow {
    quantize weights int8, int4 group 128, nf4 group 64
    offload host
    keep lm_head, "model.embed_tokens"
  }
  minimize latency token
}
"""


def timed_solve(path: Path, repeat: int, workers: int) -> dict:
    solves, builds, statuses = [], [], set()
    for _ in range(repeat):
        result = solve_plan(load_plan(path), time_limit_s=60, workers=workers, use_profile=False)
        solves.append(result.solve_s)
        builds.append(result.build_s)
        statuses.add(result.solution.status)
    return {"status": "/".join(sorted(statuses)), "solve_s": statistics.median(solves),
            "build_s": statistics.median(builds), "size": result.problem_size, "result": result}


def greedy_ratio(path: Path, workers: int) -> tuple[float, float, float]:
    plan_file = load_plan(path)
    plan = plan_file.plan
    inventory, target = load_inventory(plan.model, plan_file.base_dir), resolve_target(plan.target)
    solver = solve_plan(plan_file, workers=workers, use_profile=False).solution.predicted.latency.token_s
    greedy = greedy_predicted(plan, inventory, target).latency.token_s
    return greedy, solver, greedy / solver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        seventy = Path(folder) / "bench_70b.lwp"
        seventy.write_text(SEVENTY_B)
        heavy = Path(folder) / "offload_heavy_70b.lwp"
        heavy.write_text(ONE_CARD_70B)
        print(f"solver benchmark (workers={args.workers}, median of {args.repeat})")
        for label, path, goal in (("70B-class, 80 blocks, 7 formats x 3 prunes x 3 places, tp<=8, 3 KV", seventy, 2.0),
                                  ("405B on 8 x H100 + host", ROOT / "plans" / "llama405b_8xh100.lwp", 10.0)):
            row = timed_solve(path, args.repeat, args.workers)
            chosen = row["result"].solution
            print(f"  {label}: {row['status']} solve {row['solve_s']:.2f} s (goal <= {goal:.0f} s: "
                  f"{'met' if row['solve_s'] <= goal else 'NOT met'}), build {row['build_s']:.2f} s, "
                  f"{row['size']}; tp={chosen.tensor_parallel}, kv={chosen.kv_format.label()}, "
                  f"token {chosen.predicted.latency.token_s * 1e3:.1f} ms")
        print("greedy (Accelerate-style) vs solver, predicted token latency:")
        for path in (ROOT / "plans" / "llama70b_two_gpus.lwp", heavy):
            greedy, solver, ratio = greedy_ratio(path, args.workers)
            print(f"  {path.stem}: greedy {greedy * 1e3:.1f} ms, solver {solver * 1e3:.1f} ms, ratio {ratio:.2f}x")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.1f} s")
