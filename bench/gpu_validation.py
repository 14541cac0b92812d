"""lwdsl's GPU cost model against published measurements (`tests/data/published_gpu.json`).

Each configuration becomes a real plan (the `arch:` model, its catalog GPUs joined pairwise by the
catalog's peer link, the workload), estimated with the configuration's weight format, KV format and
tensor degree exactly as `lwdsl estimate --with weights=... --with kv=... --with tensor=N` does.

    .venv/bin/python bench/gpu_validation.py            # the table of docs/GPU_VALIDATION.md
    .venv/bin/python bench/gpu_validation.py --json     # the rows as JSON
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "published_gpu.json"
BANDS = {"decode_tok_s": 0.20, "decode_ms": 0.20, "request_tok_s": 0.20, "ttft_ms": 0.30}


def plan_text(config: dict) -> str:
    """A plan of one published configuration: its GPUs (catalog ids) linked pairwise at the catalog's
    peer link, per direction (half the bidirectional NVLink figure)."""
    from lwdsl.hardware.catalog import hardware_entry

    n = int(config["tensor"])
    gpu = config["gpu"]
    peer = hardware_entry(gpu).get("peer_link") or hardware_entry(gpu)["host_link"]
    rate_gb = peer["rate_Bps"] / 2 / 1e9
    latency_us = peer["latency_s"] * 1e6
    devices = "\n".join(f'    device g{i} gpu "{gpu}"' for i in range(n))
    links = "\n".join(f"    link g{a} <-> g{b} {rate_gb:g} GB/s latency {latency_us:g} us"
                      for a in range(n) for b in range(a + 1, n))
    name = config["id"].replace("-", "_").replace(".", "_")
    return (f'plan {name} {{\n  model "arch:{config["model"]}"\n  target {{\n{devices}\n{links}\n  }}\n'
            f'  workload inference {{ batch {config["batch"]}; context {config["context"]}; '
            f'generate {config["generate"]} }}\n}}\n')


def predict(config: dict) -> dict:
    """lwdsl's figure for the configuration's published metric, and whether every GPU fits."""
    from lwdsl.estimate import Settings, estimate_once, parse_format
    from lwdsl.hardware import resolve_target
    from lwdsl.inventory import load_inventory
    from lwdsl.parse import parse_text

    plan = parse_text(plan_text(config))
    inventory = load_inventory(plan.model, ROOT)
    target = resolve_target(plan.target)
    settings = Settings(weights=parse_format(config["weights"]),
                        kv=parse_format(config["kv"]) if config.get("kv") else None,
                        tensor_parallel=int(config["tensor"]))
    report = estimate_once(plan, inventory, target, settings)
    latency = report.latency
    token_s, prefill_s, request_s = latency["token_s"], latency["prefill_s"], latency["request_s"]
    value = {"decode_tok_s": 1.0 / token_s, "decode_ms": token_s * 1e3, "ttft_ms": prefill_s * 1e3,
             "request_tok_s": config["batch"] * config["generate"] / request_s}[config["metric"]]
    fits = all(d["fits"] for d in report.memory["by_device"].values())
    peak = max(d["total_bytes"] for d in report.memory["by_device"].values())
    return {"predicted": value, "fits": fits, "peak_gib": peak / 2 ** 30}


def rows() -> list[dict]:
    configs = json.loads(DATA.read_text())["configs"]
    out = []
    for config in configs:
        result = predict(config)
        ratio = result["predicted"] / config["published"]
        band = BANDS[config["metric"]]
        out.append({**config, **result, "ratio": ratio, "in_band": abs(ratio - 1) <= band})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| config | engine | source | date | metric | published | lwdsl | ratio | band |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in table:
        setup = (f"{r['model']} {r['weights']}{' kv ' + r['kv'] if r.get('kv') else ''}, {r['tensor']} x {r['gpu']}, "
                 f"batch {r['batch']}, {r['context']}+{r['generate']}")
        mark = ("ok" if r["in_band"] else "OUT") + (" (fit)" if r.get("fitted") else "")
        lines.append(f"| {setup} | {r['engine'].split(' (')[0]} ({r['kind']}) | {r['source'].split(' (')[0]} | "
                     f"{r['date']} | {r['metric']} | {r['published']:g} | {r['predicted']:.4g} | {r['ratio']:.2f} | "
                     f"{mark} ±{BANDS[r['metric']]:.0%} |")
    return "\n".join(lines)


def summary(table: list[dict]) -> str:
    parts = []
    for label, metrics in (("decode", ("decode_tok_s", "decode_ms", "request_tok_s")), ("TTFT", ("ttft_ms",))):
        group = [r for r in table if r["metric"] in metrics]
        inside = sum(r["in_band"] for r in group)
        worst = max((max(r["ratio"], 1 / r["ratio"]) for r in group), default=1.0)
        parts.append(f"{label}: {inside}/{len(group)} within ±{BANDS[metrics[0]]:.0%} (worst factor {worst:.2f})")
    checks = [r for r in table if not r.get("fitted")]
    parts.append(f"checks (rows not used to set a parameter): {sum(r['in_band'] for r in checks)}/{len(checks)} in band")
    parts.append(f"fit: {sum(r['fits'] for r in table)}/{len(table)} predicted to fit")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    table = rows()
    if "--json" in sys.argv:
        print(json.dumps(table, indent=1))
    else:
        print(markdown(table))
        print()
        print(summary(table))
