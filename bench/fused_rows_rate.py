# PYTHONPATH=. .venv/bin/python bench/fused_rows_rate.py [--blocks 32] [--width 896] [--inner 4864] [--library A.so,B.so]
"""The fused decode step's streaming rate per weight family on synthetic blocks beyond the caches (the
probe's blocks, `probe_native._fused_model`), against the streaming read measured in the same rounds:
what "% of the bound" means for every fused row of `bench_decode.py` / `bench_models.py`, without a
model. `--library` times other builds of the native sources side by side (e.g. the previous commit's,
compiled by hand with `native.py`'s flags), interleaved round by round; default: the build in use."""
import argparse
import ctypes
import statistics
import time

import torch

from lwdsl.apply import native
from lwdsl.hardware.probe_native import _fused_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--inner", type=int, default=4864)
    parser.add_argument("--families", default="fp32,int8,int4,int8g")
    parser.add_argument("--library", default="", help="comma-separated .so paths (default: the build in use)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    libraries = {path: ctypes.CDLL(path) for path in args.library.split(",") if path} or \
        {f"in use ({native.loaded_level()})": native._library()}
    for library in libraries.values():
        library.lwdsl_llama_step.argtypes = [ctypes.POINTER(native.LwModel), ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_void_p]
    families = args.families.split(",")
    models = {f: _fused_model(torch, native, f, args.blocks, args.width, args.threads, inner=args.inner)
              for f in families}
    data = torch.ones(64 << 20)

    def read_Bps() -> float:  # bench_decode's bound: a 256 MB float32 sum, best of 3
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - started)
        return data.numel() * 4 / best

    rates = {(name, f): [] for name in libraries for f in families}
    reads = []
    for _ in range(args.rounds):
        reads.append(read_Bps())
        for name, library in libraries.items():
            for family, (described, _keep, weights) in models.items():
                hidden, logits = torch.zeros(args.width), torch.empty(described.head.N)
                library.lwdsl_llama_step(ctypes.byref(described), hidden.data_ptr(), 1, logits.data_ptr())
                best = float("inf")
                for _ in range(5):
                    started = time.perf_counter()
                    library.lwdsl_llama_step(ctypes.byref(described), hidden.data_ptr(), 1, logits.data_ptr())
                    best = min(best, time.perf_counter() - started)
                rates[name, family].append(weights / best)
    read = statistics.median(reads)
    print(f"{args.blocks} blocks {args.width} wide (MLP {args.inner}), {args.threads} threads, {args.rounds} rounds; "
          f"streaming read median {read / 1e9:.1f} GB/s ({min(reads) / 1e9:.1f}-{max(reads) / 1e9:.1f})")
    print("| build | family | MB a step | GB/s (median of rounds) | % of the read |")
    print("|---|---|---:|---:|---:|")
    for (name, family), values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {family} | {models[family][2] / 1e6:.1f} | {rate / 1e9:.1f} | {rate / read:.0%} |")


if __name__ == "__main__":
    main()
