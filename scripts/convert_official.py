#!/usr/bin/env python
"""Convert an official STAR checkpoint (.pth) into our format (config.json + safetensors).

    python scripts/convert_official.py --ckpt STAR.pth --preset star-d30-1024 \
        --vae vae_ch160v4096z32.pth --out checkpoints/star-d30-1024

A sampler checkpoint (from the official train_sampler.py) also yields sampler.safetensors (head for scales >= 9).
The official files do not record RoPE / head settings: the preset supplies them (see models/checkpoint.py).
Converted models keep the official cross-attention behaviour (legacy_cross_attn_batch0=true) so they
reproduce the released weights' outputs.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from models.checkpoint import (  # noqa: E402
    OFFICIAL_PRESETS,
    load_official_star_and_sampler,
    load_official_vqvae,
    save_pretrained,
)
from models.vqvae import VQVAEConfig  # noqa: E402
from utils import cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, type=Path, help="official transformer checkpoint (.pth)")
    parser.add_argument("--preset", required=True, choices=sorted(OFFICIAL_PRESETS))
    parser.add_argument("--vae", type=Path, help="VAR's vae_ch160v4096z32.pth (optional)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--allow-partial", action="store_true", help="load even if some keys do not fit")
    args = parser.parse_args()
    star, sampler = load_official_star_and_sampler(args.ckpt, preset=args.preset, allow_partial=args.allow_partial)
    vae = None
    if args.vae is not None:
        vae = load_official_vqvae(args.vae, VQVAEConfig(patch_nums=star.cfg.patch_nums))
    save_pretrained(args.out, star, vae, extra_config={"converted_from": args.ckpt.name, "preset": args.preset},
                    sampler=sampler)
    print(json.dumps({"out": str(args.out), "params": sum(p.numel() for p in star.parameters()),
                      "vqvae": vae is not None, "sampler": sampler is not None}))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
