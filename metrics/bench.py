"""Shared pieces of the benchmark scripts (scripts/bench_*.py): dtypes, device sync, the JSON report."""
from __future__ import annotations

import json
import resource

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_report(out: dict, device: torch.device) -> None:
    """Add peak memory (RSS; CUDA when used) and the torch version, then print one JSON object."""
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if device.type == "cuda":
        out["peak_cuda_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    out["torch"] = torch.__version__
    print(json.dumps(out, indent=1))
