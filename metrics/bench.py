"""Shared pieces of the benchmark scripts (scripts/bench_*.py): dtypes, device sync, the JSON report."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from models import PATCH_NUMS, STAR_SIZES
from utils import cli

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_parser(doc: str, batch: int, cfg: float, cfg_help: str = "guidance scale") -> argparse.ArgumentParser:
    """The flags every benchmark script shares (model, shape, numerics, device, repetitions, threads)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="star-d16", choices=sorted(STAR_SIZES))
    p.add_argument("--resolution", choices=sorted(PATCH_NUMS),
                   help="patch schedule (default 256; star-tiny has its own 64x64 one)")
    p.add_argument("--batch", type=cli.positive_int, default=batch)
    p.add_argument("--cfg", type=float, default=cfg, help=cfg_help)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--device", type=cli.device_arg, default=cli.default_device())
    p.add_argument("--repeats", type=cli.positive_int, default=3,
                   help="timed runs after one warm-up (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    return p


def parse_bench_args(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, torch.device, torch.dtype]:
    """Parse the command line, apply ``--threads``; returns (args, device, dtype). ``args.resolution`` is None
    for star-tiny (its own schedule), else the schedule's name."""
    args = parser.parse_args()
    if args.size == "star-tiny" and args.resolution is not None:
        parser.error("star-tiny has its own 64x64 schedule: drop --resolution")
    if args.size != "star-tiny" and args.resolution is None:
        args.resolution = "256"
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: leave the default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, torch.device(args.device), DTYPES[args.dtype]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of the fastest of ``repeats`` n^3 matmuls: the machine's practical peak, timed in the benchmark's
    own process. The fastest, not the median: on a shared machine the rate of the same matmul varied from 95 to
    175 GFLOP/s within minutes, and a peak should be what the machine can reach."""
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
    return 2 * n ** 3 / min(times) / 1e9


def paired_fraction(flops: float, seconds: list[float], matmul_rates: list[float]) -> float:
    """Median over timed runs of (flops / seconds_i) / matmul_rates_i, each run against the matmul rate timed
    right after it (``matmul_gflops``, GFLOP/s): on a shared machine whose speed changes within minutes, a run
    and the matmul next to it see the same machine. (One rate for all runs gave 0.52 to 1.08 for the same
    code on the reference CPU within ten minutes.)"""
    return statistics.median(flops / t / 1e9 / rate for t, rate in zip(seconds, matmul_rates))


def print_report(out: dict, device: torch.device) -> None:
    """Add peak memory (RSS; CUDA when used) and the torch version, then print one JSON object."""
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if device.type == "cuda":
        out["peak_cuda_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    out["torch"] = torch.__version__
    print(json.dumps(out, indent=1))
