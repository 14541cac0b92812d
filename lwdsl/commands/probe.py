"""`lwdsl probe`: measure this machine, cache the figures, print a ready `device` block."""
from __future__ import annotations

import argparse
import json
import os

HELP = "Measure this machine (memory bandwidth, matmul rates), cache it, print a ready `device` block."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=("cpu", "gpu", "disk"), default="cpu", help="what to measure (default cpu)")
    parser.add_argument("--cached", action="store_true", help="print the cached figures, measure only if none")
    parser.add_argument("--show", action="store_true",
                        help="print what is cached, for which CPU and native build, and whether it is current here")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads to measure with")
    parser.add_argument("--ranks", type=int, default=None, metavar="N",
                        help="measure only the collectives of N gloo ranks on this machine (all-gather, "
                             "reduce-scatter, all-reduce, copy), as `lwdsl train` runs N ranks; cached as "
                             "`collective:gloo:NxT` (T = torch threads a rank)")


def device_block(figures: dict, name: str = "local0") -> str:
    """The measured figures as plan text (in the plan language's units)."""
    from lwdsl.estimate_view import size

    rate = figures["rates"].get("fp32", 0.0)
    lines = [f'device {name} {figures["kind"]} "local" {{',
             f"  memory {size(figures['memory_bytes'])}".replace(",", ""),
             f"  bandwidth {figures['bandwidth_Bps'] / 1e9:.1f} GB/s"]
    lines += [f"  compute {rate / 1e9:.1f} GFLOPS"] if figures["kind"] != "disk" else []
    lines += ["}"]
    return "\n".join(lines)


def show(probe) -> int:
    """Every cached record: what it measured and on which CPU, and whether this machine would use it."""
    path = probe.default_cache_file()
    records = probe.read_cache()
    if not records:
        print(f"# nothing cached in {path}: `lwdsl probe` measures this machine")
        return 0
    here = probe.cpu_identity()
    print(f"# {path}")
    print(f"# this machine: {here['model']}, {here['cores']} cores, ISA {' '.join(here['isa']) or '-'}, "
          f"AMX {'granted' if here['amx'] else 'no'}")
    from lwdsl.hardware import probe_collective

    for kind, record in sorted(records.items()):
        cpu = record.get("cpu") or {}
        stale = []
        if kind.startswith("collective:"):
            fitted = ", ".join(f"{op} {f['Bps'] / 1e9:.2f} GB/s + {f['latency_s'] * 1e3:.1f} ms"
                               for op, f in (record.get("fit") or {}).items())
            current = record.get("version") == probe_collective.VERSION and cpu == here
            print(f"{kind}: measured {record.get('measured_at', '?')} (load {record.get('load_average', 0):.1f}): {fitted}")
            print(f"  {'current' if current else 'stale here (measured again on use)'}")
            continue
        if record.get("version") != probe.VERSION:
            stale.append(f"probe version {record.get('version')} (now {probe.VERSION})")
        if cpu != here:
            stale.append("measured on another CPU" if cpu else "no CPU recorded")
        if kind == "cpu" and record.get("native") != probe._native_build():
            stale.append("other native kernels")
        print(f"{kind}: measured {record.get('measured_at', '?')} on {cpu.get('model', '?')} "
              f"({cpu.get('cores', '?')} cores, ISA {' '.join(cpu.get('isa', [])) or '?'}, "
              f"AMX {'granted' if cpu.get('amx') else 'no'}), {record.get('threads', '?')} threads, "
              f"native {record.get('native_isa') or 'none'} build {record.get('native', '-')}")
        prefill = record.get("prefill") or {}
        if prefill.get("int_dtype"):
            print("  int prefill matmul: " + ", ".join(
                f"{rows} rows {name}" for rows, name in sorted(prefill["int_dtype"].items(), key=lambda i: int(i[0]))))
        print(f"  {'current' if not stale else 'stale here (measured again on use): ' + '; '.join(stale)}")
    return 0


def collectives(args: argparse.Namespace) -> int:
    """`--ranks N`: spawn N gloo ranks, time their collectives, cache and print the fitted figures."""
    from lwdsl.errors import fail
    from lwdsl.hardware import probe, probe_collective

    if args.ranks < 2:
        raise fail("E408", f"--ranks {args.ranks}: a collective needs at least 2 ranks", hint="--ranks 2")
    figures = probe_collective.measure_collectives(args.ranks, args.threads)
    probe.write_cache(figures)
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True))
        return 0
    print(f"# {figures['ranks']} gloo ranks x {figures['threads']} thread(s) on this machine at "
          f"{figures['measured_at']} (load {figures['load_average']:.1f}); a call over B whole-tensor bytes "
          "costs start-up + B / rate")
    for op, fitted in figures["fit"].items():
        print(f"{op:>15}: {fitted['Bps'] / 1e9:6.2f} GB/s, start-up {fitted['latency_s'] * 1e3:6.3f} ms")
    print(f"# cached in {probe.default_cache_file()} as {figures['kind']}")
    return 0


def run(args: argparse.Namespace) -> int:
    from lwdsl.hardware import probe

    if args.show:
        return show(probe)
    if args.ranks is not None:
        return collectives(args)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.cached:
        figures = probe.read_cache().get(args.kind) or probe.local_figures(args.kind)  # as cached, any version
    else:
        figures = probe.measure(args.kind)
        probe.write_cache(figures)
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True))
        return 0
    if figures["kind"] == "disk":
        passes = ", ".join(f"{rate / 1e9:.2f}" for rate in figures.get("passes_Bps", []))
        print(f"# {figures['source']} at {figures['measured_at']}")
        print(f"# streamed read {figures['bandwidth_Bps'] / 1e9:.2f} GB/s (median of passes: {passes} GB/s)")
        print(f"# cached in {probe.default_cache_file()}")
        print(device_block(figures, "disk0"))
        return 0
    rates = ", ".join(f"{k} {v / 1e9:,.1f} G{'OP' if k.startswith('int') else 'FLOP'}/s"
                      for k, v in figures["rates"].items())
    print(f"# {figures['source']} at {figures['measured_at']}")
    print(f"# streaming read {figures['bandwidth_Bps'] / 1e9:.1f} GB/s, copy {figures['copy_Bps'] / 1e9:.1f} GB/s "
          f"(read + write); {rates}; op overhead {figures['op_overhead_s'] * 1e6:.1f} us")
    fused = figures.get("fused")
    if fused:
        widths = ", ".join(f"{family} {min(t.values()) / 1e9:.1f}-{max(t.values()) / 1e9:.1f} GB/s"
                           for family, t in fused["stream_Bps"].items())
        print(f"# fused decode step: {widths}; {fused['block_s'] * 1e6:.1f} us a block, "
              f"{fused['step_s'] * 1e6:.1f} us a step")
    eager = figures.get("eager") or {}
    if eager:
        print("# eager decode step (layouts the fused step does not compute): " + ", ".join(
            f"{layout} {f['block_s'] * 1e6:.0f} us a block + {f['step_s'] * 1e6:.0f} us a step" for layout, f in eager.items()))
    cpu = figures.get("cpu") or {}
    prefill = figures.get("prefill") or {}
    chosen = ", ".join(f"{rows} rows {name}" for rows, name in sorted((prefill.get("int_dtype") or {}).items(),
                                                                      key=lambda item: int(item[0])))
    print(f"# CPU {cpu.get('model', '?')}, {cpu.get('cores', '?')} cores, AMX {'granted' if cpu.get('amx') else 'no'}; "
          f"native kernels: {figures.get('native_isa') or 'none (torch kernels)'}"
          + (f"; int prefill matmul: {chosen}" if chosen else ""))
    load = figures.get("load_average")
    if load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"# warning: load average {load:.1f} on {os.cpu_count()} CPUs while measuring: other work "
              "shared the machine, so these figures are low; probe again when it is quiet")
    print(f"# cached in {probe.default_cache_file()}")
    print(device_block(figures))
    return 0
