#!/usr/bin/env python3
"""GEMM peak of the GPU at 8192^3, the roofline the FP8 and bf16 prefill figures are read
against (docs/benchmarks.md): bf16 through torch.mm and FP8 E4M3 through torch._scaled_mm
(cuBLASLt), both with f32 accumulation, best of 20 timed runs after warm-up, as TFLOP/s.
Prints one JSON line per dtype. Needs torch with CUDA (the GPU machine has it); run by
ci/gpu_bench.sh's fp8 suite."""
import json
import sys

try:
    import torch
except ImportError:
    print("gemm_peak: torch is not installed; skipped", file=sys.stderr)
    sys.exit(0)


def best_ms(fn, runs=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def main():
    n = 8192
    flops = 2 * n**3
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = best_ms(lambda: torch.mm(a, b))
    print(json.dumps({"gemm": "bf16", "m": n, "n": n, "k": n, "ms": ms,
                      "tflops": flops / ms / 1e9, "device": torch.cuda.get_device_name()}))
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device="cuda", dtype=torch.float32)
    ms = best_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one,
                                          out_dtype=torch.bfloat16))
    print(json.dumps({"gemm": "fp8_e4m3", "m": n, "n": n, "k": n, "ms": ms,
                      "tflops": flops / ms / 1e9, "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
