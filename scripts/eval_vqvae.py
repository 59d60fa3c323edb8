#!/usr/bin/env python
"""Reconstruction quality of a VQ-VAE on shapes samples: PSNR, and the shapes judge on reconstructions
(the ceiling a generator using this tokenizer can reach).

    python scripts/eval_vqvae.py --vqvae outputs/shapes_vqvae/final --count 256
    python scripts/eval_vqvae.py --config configs/shapes_vqvae.json --count 256     # a fresh (untrained) init
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metrics.shapes_eval import reference_images  # noqa: E402
from metrics.shapes_judge import judge, parse_prompt, summarize  # noqa: E402
from models.checkpoint import load_pretrained_vqvae  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402
from utils import cli  # noqa: E402
from utils.data.shapes import make_sample  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vqvae", help="our checkpoint directory (vqvae.safetensors + config.json)")
    src.add_argument("--config", help="a run config: evaluate a freshly initialised VQ-VAE (seed --seed)")
    p.add_argument("--count", type=cli.positive_int, default=256)
    p.add_argument("--split", default="heldout", choices=["train", "heldout"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=cli.positive_int, default=64)
    p.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = p.parse_args()
    if args.vqvae:
        vae = load_pretrained_vqvae(args.vqvae)
    else:
        from trainer.config import RunConfig
        from utils.config import load_config
        torch.manual_seed(args.seed)
        vae = VQVAE(load_config(RunConfig, args.config, ["--star_train.vqvae=unused"]).vqvae).eval()
    size = vae.cfg.image_size
    samples = [make_sample(i, args.split) for i in range(args.count)]
    verdicts, kinds, mses = [], [], []
    for start in range(0, len(samples), args.batch):
        chunk = samples[start:start + args.batch]
        img = reference_images(chunk, size)
        with torch.no_grad():
            rec = vae.idx_to_img(vae.img_to_idx(img))
        mses += ((rec - img) / 2).pow(2).flatten(1).mean(1).tolist()
        pixels = rec.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        for s, px in zip(chunk, pixels):
            verdicts.append(judge(px, s.caption))
            kinds.append(parse_prompt(s.caption)["kind"])
    psnr = float(np.mean([10 * np.log10(1 / max(m, 1e-10)) for m in mses]))
    report = json.dumps({"psnr_db": psnr, "count": len(samples), "split": args.split, "image_size": size,
                         "judge_on_reconstructions": summarize(verdicts, kinds)}, indent=1)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
