#!/usr/bin/env python
"""Benchmark generation with random weights; prints one JSON object.

    python scripts/bench_generate.py --size star-d16 --resolution 256 --batch 1 --cfg 4 --repeats 3

Reports the median over ``--repeats`` timed runs after one warm-up: seconds per batch (``seconds_median``),
per image, images/s, tokens/s, the transformer / VQ-VAE-decode split, peak RSS (and peak CUDA memory), the
analytic FLOP counts of both parts (metrics/flops.py) and their achieved fraction of a large fp32/bf16 matmul
timed in the same process (the machine's practical peak; the fractions pair every timed run with the matmul
rate timed right after it, ``metrics.bench.paired_fraction``), and ``seconds_at_matmul_peak``: the time every
counted FLOP would take at the fastest matmul rate seen. The decode's count is direct convolution's: with the
Winograd convolutions of CPU inference (models/conv.py) its fraction of the peak can exceed 1.
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402

from metrics.bench import bench_parser, matmul_gflops, paired_fraction, parse_bench_args, print_report, sync  # noqa: E402
from metrics.flops import star_generation_flops, vqvae_decode_flops  # noqa: E402
from models import build_star, build_vqvae, star_config, vqvae_config  # noqa: E402
from models import conv as conv_module  # noqa: E402
from models.checkpoint import OFFICIAL_SAMPLE_FROM  # noqa: E402
from models.sampler import SCHEDULES, SamplerHead  # noqa: E402
from utils import cli  # noqa: E402


def main() -> int:
    p = bench_parser(__doc__, batch=1, cfg=4.0)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--legacy-cross-attn", action="store_true", help="official batch-0 cross-attention")
    p.add_argument("--sampler", action="store_true", help="with a (random) sampler head on scales >= 9 (or the last)")
    p.add_argument("--sampler-schedule", default="official-1024", choices=SCHEDULES)
    args, device, dtype = parse_bench_args(p)

    torch.manual_seed(0)
    cfg = star_config(args.size, args.resolution, legacy_cross_attn_batch0=args.legacy_cross_attn)
    vcfg = vqvae_config("vqvae-tiny" if args.size == "star-tiny" else "vqvae-f16-c160", patch_nums=cfg.patch_nums,
                        vocab_size=cfg.vocab_size, z_channels=cfg.z_channels)
    with device:  # random init on the target device (star-d30 takes ~1 min on a 2-core CPU)
        star = build_star(cfg).eval()
        vae = build_vqvae(vcfg).eval()
        head = None
        if args.sampler:
            head = SamplerHead(cfg, sample_from=min(OFFICIAL_SAMPLE_FROM, len(cfg.patch_nums) - 1))
            head.init_weights()
            head = head.eval()
    if args.compile:
        for block in star.blocks + (list(head.feat_extract_blocks) if head is not None else []):
            block.compile()
    B, T = args.batch, args.text_len
    hidden = torch.randn(2 * B, T, cfg.text_dim, device=device)
    mask = torch.ones(2 * B, T, dtype=torch.long, device=device)
    mask[B:, 2:] = 0  # the "" prompt: BOS, EOS, padding
    pooled = torch.randn(2 * B, cfg.text_dim, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    decode_times = []
    real_decode = vae.fhat_to_img

    def timed_decode(f_hat):
        sync(device)
        t0 = time.perf_counter()
        out = real_decode(f_hat)
        sync(device)
        decode_times.append(time.perf_counter() - t0)
        return out

    vae.fhat_to_img = timed_decode  # instance attribute on our own object: times the decode inside generate
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, scale_ends, rates = [], [], []

    def end_of_scale(si: int) -> None:
        sync(device)
        scale_ends[-1].append(time.perf_counter())

    for i in range(args.repeats + 1):
        gen = torch.Generator(device).manual_seed(i)
        sync(device)
        t0 = time.perf_counter()
        scale_ends.append([t0])
        with autocast:
            star.generate(vae, hidden, mask, pooled, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, generator=gen,
                          sampler=head, sampler_schedule=args.sampler_schedule, scale_callback=end_of_scale)
        sync(device)
        times.append(time.perf_counter() - t0)
        if i:
            rates.append(matmul_gflops(device, dtype, repeats=3))  # the machine's speed right after this run
    times, decode = times[1:], decode_times[1:]
    # Seconds per scale (transformer, sampling and the f_hat update; the first includes the text K/V).
    per_scale = [statistics.median(ends[s + 1] - ends[s] for ends in scale_ends[1:])
                 for s in range(len(cfg.patch_nums))]
    sec = statistics.median(times)
    dec = statistics.median(decode)
    flops = star_generation_flops(cfg, B, T)
    decode_flops = vqvae_decode_flops(vcfg, B)
    peak = max(rates + [matmul_gflops(device, dtype)])
    transformer_times = [t - d for t, d in zip(times, decode)]
    out = {
        "size": args.size, "resolution": args.resolution, "patch_nums": list(cfg.patch_nums), "batch": B,
        "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "compile": args.compile, "repeats": args.repeats,
        "winograd_decode": device.type == "cpu" and conv_module._HAVE_NNPACK,  # models/conv.py
        "sampler": args.sampler, "sampler_schedule": args.sampler_schedule if args.sampler else None,
        "seconds_median": sec, "seconds_all": times, "seconds_per_image": sec / B, "images_per_s": B / sec,
        "tokens_per_s": B * cfg.seq_len / sec, "transformer_seconds_median": sec - dec,
        "vqvae_decode_seconds_median": dec, "scale_tokens": [pn * pn for pn in cfg.patch_nums],
        "scale_seconds_median": per_scale, "transformer_flops": flops,
        "transformer_gflops_per_s": flops / (sec - dec) / 1e9, "matmul_gflops_per_s": peak,
        "matmul_gflops_per_s_after_each_run": rates,
        "transformer_fraction_of_matmul_peak": paired_fraction(flops, transformer_times, rates),
        "vqvae_decode_flops": decode_flops,
        "vqvae_decode_fraction_of_matmul_peak": paired_fraction(decode_flops, decode, rates),
        # The time the whole generation would take if every counted FLOP ran at the matmul rate: a floor for
        # any implementation that computes the same thing in this dtype with matmuls and direct convolutions.
        "seconds_at_matmul_peak": (flops + decode_flops) / 1e9 / peak,
    }
    if args.sampler:  # the analytic formula covers the backbone only: the rates would be misleading
        for key in ("transformer_flops", "transformer_gflops_per_s", "transformer_fraction_of_matmul_peak",
                    "seconds_at_matmul_peak"):
            out[key] = None
        out["flops_note"] = "FLOP count not computed with the sampler head (backbone-only formula)"

    print_report(out, device)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
