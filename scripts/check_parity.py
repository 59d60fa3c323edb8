#!/usr/bin/env python
"""Compare our models with the official implementation's golden tensors.

    python scripts/check_parity.py --reference-dir ../shared/reference --part all

Prints one JSON object (max-abs error / token-match fraction per tensor, pass/fail per part) and exits 1 on
any failure. Works for any directory holding tiny_{vae,star,star_sampler}_{state,golden}.* files.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from metrics.parity import FLOAT_TOL, IMAGE_TOL_FACTOR, PARTS, run  # noqa: E402
from utils import cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", required=True, type=Path)
    parser.add_argument("--part", default="all", choices=[*PARTS, "all"])
    parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--device", type=cli.device_arg, default="cpu",
                        help="run our models here (fp32; TF32 is switched off)")
    parser.add_argument("--float-tol", type=float, default=FLOAT_TOL,
                        help=f"max-abs tolerance for float tensors; decoded images get {IMAGE_TOL_FACTOR:g} times "
                             "it, as their convolution kernels round differently on other CPUs/GPUs")
    args = parser.parse_args()
    if args.device.startswith("cuda"):  # compare true fp32 arithmetic
        import torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if not args.reference_dir.is_dir():
        parser.error(f"--reference-dir {args.reference_dir} is not a directory")
    parts = list(PARTS) if args.part == "all" else [args.part]
    result = run(args.reference_dir, parts, args.device, args.float_tol)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))
