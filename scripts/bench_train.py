#!/usr/bin/env python
"""Benchmark one STAR training step (forward, backward, clip, AdamW) with random weights and tokens.

    python scripts/bench_train.py --size star-d16 --resolution 256 --batch 4 --repeats 3 --threads 2

VQ-VAE encoding and text encoding are excluded (as the official reference timing); the inputs are random
teacher-forcing maps and text features. Prints one JSON object with ``seconds_median`` per step, the analytic
FLOP count of the step (metrics/flops.py) and the achieved GFLOP/s next to a large matmul timed in the same
process (``fraction_of_matmul_peak`` pairs every timed step with the matmul rate timed right after it,
``metrics.bench.paired_fraction``).
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metrics.bench import bench_parser, matmul_gflops, paired_fraction, parse_bench_args, print_report, sync  # noqa: E402
from metrics.flops import star_training_flops  # noqa: E402
from models import build_star, star_config  # noqa: E402
from models.star import ATTENTION_KERNELS  # noqa: E402
from trainer.config import OptimConfig  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from utils import cli  # noqa: E402


def main() -> int:
    p = bench_parser(__doc__, batch=4, cfg=0.0, cfg_help="unused for training (kept for a uniform CLI)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (star_train.activation_checkpointing)")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="sdpa",
                   help="self-attention kernel (star_train.attention); flex needs CUDA")
    args, device, dtype = parse_bench_args(p)
    if args.attention == "flex" and device.type != "cuda":
        p.error("--attention flex needs --device cuda (PyTorch has no FlexAttention backward on the CPU)")
    torch.manual_seed(0)
    cfg = star_config(args.size, args.resolution)
    with device:  # random init on the target device (faster than on the CPU for the large sizes)
        model = build_star(cfg).train()
    model.set_activation_checkpointing(args.activation_checkpointing)
    model.set_attention_kernel(args.attention)
    trained = torch.compile(model) if args.compile else model
    opt = build_optimizer(model, OptimConfig(fused=device.type == "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    B, L, T = args.batch, cfg.seq_len, 77
    var_input = torch.randn(B, L - 1, cfg.z_channels, device=device)
    gt = torch.randint(cfg.vocab_size, (B, L), device=device)
    hidden = torch.randn(B, T, cfg.text_dim, device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    pooled = torch.randn(B, cfg.text_dim, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits, _ = trained(var_input, hidden, mask, pooled)
            loss = F.cross_entropy(logits.flatten(0, 1), gt.flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    times, rates = [], []
    for _ in range(args.repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) > 1:
            rates.append(matmul_gflops(device, dtype, repeats=3))  # the machine's speed right after this step
    sec = statistics.median(times[1:])
    flops = star_training_flops(cfg, B, L, T)  # model FLOPs: recomputation by activation checkpointing not counted
    peak = max(rates + [matmul_gflops(device, dtype)])
    out = {"size": args.size, "resolution": args.resolution, "batch": B, "dtype": args.dtype, "device": str(device),
           "threads": torch.get_num_threads(), "compile": args.compile,
           "activation_checkpointing": args.activation_checkpointing, "attention": args.attention,
           "repeats": args.repeats,
           "seconds_median": sec, "seconds_all": times[1:], "images_per_s": B / sec, "tokens_per_s": B * L / sec,
           "flops": flops, "gflops_per_s": flops / sec / 1e9, "matmul_gflops_per_s": peak,
           "matmul_gflops_per_s_after_each_run": rates,
           "fraction_of_matmul_peak": paired_fraction(flops, times[1:], rates)}
    print_report(out, device)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
