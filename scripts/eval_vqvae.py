#!/usr/bin/env python
"""Reconstruction quality of a VQ-VAE: PSNR, SSIM, codebook usage and, given Inception weights, rFID; on shapes
samples (plus the shapes judge on the reconstructions: the ceiling a generator using this tokenizer can reach) or
on images packed with test_pack.py.

    python scripts/eval_vqvae.py --vqvae outputs/shapes_vqvae/final --count 256
    python scripts/eval_vqvae.py --config configs/shapes_vqvae.json --count 256     # a fresh (untrained) init
    python scripts/eval_vqvae.py --vqvae runs/vqvae/final --lmdb data/heldout --count 50000 \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --grid recon.png    # your held-out images
    python scripts/eval_vqvae.py --vqvae vae_ch160v4096z32.pth --lmdb data/imagenet_val --device cuda   # VAR's

Packed images are centre-cropped to the short side and resized to the tokenizer's size (as in training without
augmentation); unreadable records are skipped and counted. A VAR ``.pth`` is read as VAR's released layout
(256^2, 10 scales). rFID is the FID between the Inception features of the originals and of the
reconstructions (pytorch-fid's network; the weights are never downloaded). Like any FID it is biased upward on
few images: papers report it on 50,000.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metrics.fid import feature_stats, frechet_distance  # noqa: E402
from metrics.reconstruction import SSIM_WINDOW, CodebookUsage, psnr_per_image, ssim_per_image  # noqa: E402
from metrics.shapes_eval import reference_images  # noqa: E402
from metrics.shapes_judge import judge, parse_prompt, summarize  # noqa: E402
from models.checkpoint import load_official_vqvae, load_pretrained_vqvae  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402
from utils import cli  # noqa: E402
from utils.data.dataset import ImageTransform, LMDBImageTextDataset  # noqa: E402
from utils.data.shapes import make_sample  # noqa: E402

GRID_IMAGES = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vqvae", help="our checkpoint directory (vqvae.safetensors + config.json) or VAR's .pth")
    src.add_argument("--config", help="a run config: evaluate a freshly initialised VQ-VAE (seed --seed)")
    p.add_argument("--lmdb", nargs="+", help="folders written by test_pack.py (default: shapes samples)")
    p.add_argument("--count", type=cli.positive_int, default=256, help="images (packed: the first N records)")
    p.add_argument("--split", default="heldout", choices=["train", "heldout"], help="shapes samples of this split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=cli.positive_int, default=64)
    p.add_argument("--device", type=cli.device_arg, default=cli.default_device())
    p.add_argument("--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth: adds rFID")
    p.add_argument("--grid", type=Path, help="write the first originals (top) over their reconstructions here")
    p.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = p.parse_args(argv)
    if args.inception_weights and args.count < 2:  # else a covariance error after every image was reconstructed
        p.error("rFID needs --count >= 2 (a covariance of Inception features)")
    return args


def load_vqvae(args) -> VQVAE:
    if args.vqvae:
        path = Path(args.vqvae)
        return load_pretrained_vqvae(path) if path.is_dir() else load_official_vqvae(path)
    from trainer.config import RunConfig
    from utils.config import load_config
    torch.manual_seed(args.seed)
    return VQVAE(load_config(RunConfig, args.config, ["--star_train.vqvae=unused"]).vqvae).eval()


def shapes_batches(args, size: int):
    """(images in [-1, 1], their captions) of shapes samples, ``args.batch`` at a time."""
    samples = [make_sample(i, args.split) for i in range(args.count)]
    for start in range(0, len(samples), args.batch):
        chunk = samples[start:start + args.batch]
        yield reference_images(chunk, size), [s.caption for s in chunk]


def packed_batches(args, size: int, skipped: list[int]):
    """(images in [-1, 1], None) of the first ``args.count`` records; unreadable ones are appended to
    ``skipped`` (the data set would stand the next record in for one: counted once, not twice)."""
    data = LMDBImageTextDataset(args.lmdb, ImageTransform(size))
    images = []
    for i in range(min(args.count, len(data))):
        item = data[i]
        if item["record"] != i:
            skipped.append(i)
            continue
        images.append(item["image"])
        if len(images) == args.batch:
            yield torch.stack(images), None
            images = []
    if images:
        yield torch.stack(images), None


def main(argv=None, extractor=None) -> int:
    """``extractor``: images (N, 3, H, W) in [0, 1] -> (N, D) features for rFID, instead of Inception's (tests)."""
    args = parse_args(argv)
    vae = load_vqvae(args).to(args.device)
    size = vae.cfg.image_size
    if extractor is None and args.inception_weights:
        from metrics.fid import InceptionFeatures
        extractor = InceptionFeatures(args.inception_weights, device=args.device)
    skipped: list[int] = []
    batches = packed_batches(args, size, skipped) if args.lmdb else shapes_batches(args, size)
    usage = CodebookUsage(len(vae.cfg.patch_nums), vae.cfg.vocab_size)
    psnr, ssim, features, verdicts, kinds, grid = [], [], ([], []), [], [], []
    for img, captions in batches:
        img = img.to(args.device)
        with torch.no_grad():
            tokens = vae.img_to_idx(img)
            rec = vae.idx_to_img(tokens)
        usage.add(tokens)
        img01, rec01 = img.add(1).div(2).float().cpu(), rec.add(1).div(2).float().cpu()  # decoder clamps
        psnr += psnr_per_image(rec01, img01)
        if size >= SSIM_WINDOW:
            ssim += ssim_per_image(rec01, img01).tolist()
        if extractor is not None:
            features[0].append(extractor(img01))
            features[1].append(extractor(rec01))
        if len(grid) < GRID_IMAGES:
            grid += list(zip(img01, rec01))[:GRID_IMAGES - len(grid)]
        if captions is not None:
            pixels = rec01.mul(255).round().byte().permute(0, 2, 3, 1).numpy()
            verdicts += [judge(px, caption) for px, caption in zip(pixels, captions)]
            kinds += [parse_prompt(caption)["kind"] for caption in captions]
    if not psnr:
        raise cli.InputError(f"no readable image among the first {args.count} records of {args.lmdb}")
    report = {"psnr_db": float(np.mean(psnr)), "ssim": float(np.mean(ssim)) if ssim else None,
              "codebook": usage.summary(), "count": len(psnr), "image_size": size,
              "data": {"lmdb": args.lmdb, "skipped": len(skipped)} if args.lmdb else {"shapes": args.split}}
    if extractor is not None:
        report["rfid"] = frechet_distance(*feature_stats(np.concatenate(features[0])),
                                          *feature_stats(np.concatenate(features[1])))
    if verdicts:
        report["judge_on_reconstructions"] = summarize(verdicts, kinds)
    if args.grid:
        from torchvision.utils import make_grid, save_image
        originals, reconstructions = zip(*grid)
        save_image(make_grid(list(originals) + list(reconstructions), nrow=len(grid)), args.grid)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
