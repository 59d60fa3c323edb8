"""Shared pieces of the benchmark scripts (scripts/bench_*.py): dtypes, device sync, the JSON report."""
from __future__ import annotations

import json
import resource
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n^3 matmul: the machine's practical peak, timed in the benchmark's own process."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def print_report(out: dict, device: torch.device) -> None:
    """Add peak memory (RSS; CUDA when used) and the torch version, then print one JSON object."""
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if device.type == "cuda":
        out["peak_cuda_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    out["torch"] = torch.__version__
    print(json.dumps(out, indent=1))
