"""`target { ... }` -> ResolvedTarget: catalog figures, the local probe, then the plan's overrides.

A `compute` property is the device's peak dense rate at its compute dtype: written in FLOPS it sets
every floating-point rate, written in TOPS every integer rate. A disk stores and never computes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lwdsl.errors import LwdslError, fail
from lwdsl.hardware.catalog import DTYPES, LOCAL, hardware_entry, hardware_ids
from lwdsl.hardware.records import DeviceSpec, LinkSpec, ResolvedTarget, SwitchSpec
from lwdsl.hardware.topology import route_table

FLOAT_DTYPES = ("fp32", "fp16", "bf16", "fp8")
INT_DTYPES = ("int8", "int4")


def _base_figures(device, probe_cache: Path | None, run_probe: bool) -> dict[str, Any]:
    if device.catalog is None:
        return {"source": "plan"}
    if device.catalog == LOCAL:
        from lwdsl.hardware.probe import local_figures  # imports torch only when a plan asks for `local`

        return local_figures(device.kind, cache_file=probe_cache, run_probe=run_probe, span=device.span)
    try:
        entry = dict(hardware_entry(device.catalog))
    except KeyError:
        raise fail("E401", f"unknown hardware '{device.catalog}'", device.span,
                   hint=f"known: {', '.join(hardware_ids())}") from None
    entry["source"] = f"catalog {device.catalog}: {entry['source']}"
    return entry


def _row_efficiency(base: dict[str, Any], device) -> tuple[tuple[int, float], ...]:
    """The probe's measured streaming efficiency by row length; dropped when the plan overrides the
    bandwidth (the user's figure is then the rate for every row)."""
    if device.kind == "disk" or device.bandwidth is not None:
        return ()
    table = base.get("row_efficiency") or {}
    return tuple(sorted((int(row), float(fraction)) for row, fraction in table.items()))


def _fused(base: dict[str, Any], device) -> dict[str, Any]:
    """The probe's fused-decode figures, for the CPU it measured; dropped with a written bandwidth
    (the user's figure then sets every stream rate) and for anything but a local CPU."""
    fused = base.get("fused")
    if device.kind != "cpu" or device.bandwidth is not None or not fused:
        return {}
    stream, cached = ({family: tuple(sorted((int(width), float(rate)) for width, rate in table.items()))
                       for family, table in (fused.get(key) or {}).items()}
                      for key in ("stream_Bps", "stream_cached_Bps"))
    curve = tuple(sorted((int(nbytes), float(rate)) for nbytes, rate in (fused.get("working_set_Bps") or {}).items()))
    eager = {model_type: (float(f["block_s"]), float(f["step_s"])) for model_type, f in (base.get("eager") or {}).items()}
    return {"fused_stream": stream, "fused_stream_cached": cached, "working_set_curve": curve,
            "fused_block_s": float(fused.get("block_s", 0.0)), "fused_step_s": float(fused.get("step_s", 0.0)),
            "fused_layout_block_s": {k: float(v) for k, v in (fused.get("layout_block_s") or {}).items()},
            "eager_steps": eager}


def _prefill(base: dict[str, Any], device) -> dict[str, Any]:
    """The probe's prefill figures: its matmul and attention rates and dequantization speed are dropped
    with a written compute rate, its elementwise bytes/s with a written bandwidth (the user's figure then
    sets them), all of them for a disk."""
    prefill = base.get("prefill")
    if device.kind == "disk" or not prefill:
        return {}

    def table(key: str) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(rows), float(value)) for rows, value in (prefill.get(key) or {}).items()))
    figures: dict[str, Any] = {}
    if device.compute is None:
        figures.update(prefill_matmul=table("matmul_flops"), prefill_attention=table("attention_flops"),
                       dequant_Bps={k: float(v) for k, v in (prefill.get("dequant_Bps") or {}).items()},
                       prefill_int_matmul=table("int_matmul_flops"),
                       prefill_attention_run=table("attention_run_flops"),
                       prefill_int_matmul_wide=table("int_matmul_flops_wide"),
                       prefill_hiddens=(int(prefill.get("hidden") or 0), int(prefill.get("wide_hidden") or 0)),
                       prefill_int_convert=table("int_convert_s_per_byte"))
    if device.bandwidth is None:
        figures["prefill_elementwise"] = table("elementwise_Bps")
    return figures


def resolve_device(device, probe_cache: Path | None = None, run_probe: bool = True) -> DeviceSpec:
    """One `ast.Device` -> DeviceSpec (E402 when a needed figure is neither in a catalog nor written)."""
    base = _base_figures(device, probe_cache, run_probe)
    rates = dict(base.get("rates") or {})
    if device.compute is not None:
        for dtype in (INT_DTYPES if device.compute.integer else FLOAT_DTYPES):
            rates[dtype] = device.compute.value
        if not device.compute.integer:
            rates.setdefault("int8", device.compute.value)
            rates.setdefault("int4", device.compute.value)
    memory = device.memory.value if device.memory else base.get("memory_bytes")
    bandwidth = device.bandwidth.value if device.bandwidth else base.get("bandwidth_Bps")
    missing = [what for what, value in (("memory", memory), ("bandwidth", bandwidth)) if value is None]
    if device.kind != "disk" and not rates:
        missing.append("compute")
    if missing:
        raise fail("E402", f"device '{device.name}' has no {' / '.join(missing)}", device.span,
                   hint=f"write {' and '.join(missing)} in its block or give a catalog id "
                        f"(e.g. \"{hardware_ids()[0]}\")")
    if device.kind == "disk":
        rates = {}
    else:
        rates = {dtype: float(rates.get(dtype) or rates.get("fp32", 0.0)) for dtype in DTYPES}
    price = device.price.value if device.price else base.get("price_per_h", 0.0)
    return DeviceSpec(name=device.name, kind=device.kind, catalog=device.catalog, memory_bytes=int(memory),
                      bandwidth_Bps=float(bandwidth), rates=rates, price_per_h=float(price),
                      op_overhead_s=0.0 if device.kind == "disk" else float(base.get("op_overhead_s", 0.0)),
                      runtime_bytes=0 if device.kind == "disk" else int(base.get("runtime_bytes", 0)),
                      row_efficiency=_row_efficiency(base, device), **_fused(base, device),
                      **_prefill(base, device),
                      source=str(base.get("source", "plan")))


def resolve_target(target, probe_cache: Path | None = None, run_probe: bool = True) -> ResolvedTarget:
    """An `ast.Target` -> ResolvedTarget; every problem found at once (E401-E404).

    `probe_cache` is the probe's JSON file (default `$LWDSL_CACHE/probe.json`); with `run_probe=False`
    a `local` device without a cache is an error instead of a measurement.
    """
    devices: dict[str, DeviceSpec] = {}
    diagnostics = []
    for device in target.devices:
        try:
            devices[device.name] = resolve_device(device, probe_cache, run_probe)
        except LwdslError as error:
            diagnostics += error.diagnostics
    links: dict[tuple[str, str], LinkSpec] = {}
    for link in target.links:
        unknown = [end for end in (link.a, link.b) if end not in {d.name for d in target.devices}]
        if unknown:
            diagnostics += fail("E403", f"link names an unknown device '{unknown[0]}'", link.span).diagnostics
            continue
        latency = link.latency.value if link.latency else 0.0
        spec = LinkSpec(a=link.a, b=link.b, rate_Bps=link.rate.value, latency_s=latency)
        links[(link.a, link.b)] = spec
        links[(link.b, link.a)] = spec
    switches = []
    for switch in getattr(target, "switches", ()):
        try:
            switches.append(resolve_switch(switch, target.devices))
        except LwdslError as error:
            diagnostics += error.diagnostics
    if diagnostics:
        raise LwdslError(diagnostics)
    return ResolvedTarget(name=target.name, devices=devices, links=links, switches=tuple(switches),
                          routes=route_table(devices, links.values(), switches))


def resolve_switch(switch, devices) -> SwitchSpec:
    """An `ast.Switch` -> SwitchSpec. Without a written rate the switch runs at its member GPUs' catalog
    interconnect (`interconnect` in hardware.json: NVLink per card on SXM parts, the PCIe slot on PCIe
    cards), the slowest of them; its latency, unless written, is that interconnect's too (E407)."""
    ports = [entry["interconnect"] for d in devices if d.name in switch.devices and d.catalog
             and d.catalog != LOCAL and d.catalog in hardware_ids()
             and (entry := hardware_entry(d.catalog)).get("interconnect")]
    slowest = min(ports, key=lambda port: port["rate_Bps"], default=None)
    if switch.rate is None and slowest is None:
        raise fail("E407", f"switch `{switch.name}` has no rate, and none of its devices has a catalog "
                           "interconnect", switch.span,
                   hint=f"write its port rate, e.g. `switch {switch.name} {{ ... }} 450 GB/s`")
    rate = switch.rate.value if switch.rate is not None else slowest["rate_Bps"]
    if switch.latency is not None:
        latency = switch.latency.value
    else:
        latency = slowest["latency_s"] if switch.rate is None else 0.0
    return SwitchSpec(name=switch.name, devices=tuple(switch.devices), rate_Bps=float(rate), latency_s=float(latency))
