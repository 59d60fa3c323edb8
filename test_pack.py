#!/usr/bin/env python
"""Pack image-caption pairs into LMDB shards (the official tool's name; it is not a test).

Inputs (one of):
  --folder DIR             images with sidecar .txt / .json captions
  --manifest FILE          JSONL or CSV with an `image` column and caption columns
  --official DIR           the official layout: DIR/<json-dir>/*.json + DIR/<image-dir>/
  --shapes N               the built-in synthetic shapes data set (N samples)
Examples:
  python test_pack.py --folder photos/ --out data/photos --max-side 512 --workers 4
  python test_pack.py --shapes 10000 --shapes-size 128 --out data/shapes128
Re-running skips finished shards (if they hold what this run would write). The record format is documented in
utils/data/records.py and the README.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from utils import cli
from utils.data.pack import (
    IMAGE_EXTS,
    OFFICIAL_CAPTION_KEYS,
    PackOptions,
    folder_items,
    manifest_items,
    official_items,
    pack,
    shapes_items,
)

SHOWN_SKIPPED = 20


def report_skipped(skipped_items: list) -> None:
    """Name the skipped inputs on stderr (the first SHOWN_SKIPPED; each shard's .done.json lists all its own)."""
    shown = SHOWN_SKIPPED
    for key, reason in skipped_items[:shown]:
        print(f"skipped {key}: {reason}", file=sys.stderr)
    if len(skipped_items) > shown:
        print(f"... and {len(skipped_items) - shown} more skipped: each shard-NNNNN.done.json lists its own "
              "under 'skipped_items'", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder")
    src.add_argument("--manifest")
    src.add_argument("--official")
    src.add_argument("--shapes", type=cli.positive_int, metavar="N")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=cli.positive_int, default=10000)
    p.add_argument("--workers", type=cli.positive_int, default=1)
    p.add_argument("--max-side", type=cli.non_negative_int, default=0, help="shrink images larger than this (0: keep)")
    p.add_argument("--min-side", type=cli.non_negative_int, default=0, help="skip images whose shorter side is smaller")
    p.add_argument("--keep-original", action="store_true", help="store original bytes when not resized")
    p.add_argument("--caption-keys", default=None, help="comma-separated caption fields to keep")
    p.add_argument("--image-dir", default="images", help="--official: image folder name")
    p.add_argument("--json-dir", default="jsons", help="--official: JSON folder name")
    p.add_argument("--shapes-split", default="train", choices=["train", "heldout"])
    p.add_argument("--shapes-size", type=cli.positive_int, default=64)
    p.add_argument("--shapes-seed", type=int, default=0)
    p.add_argument("--shapes-texture", type=cli.fraction, default=0.0)
    args = p.parse_args()

    keys = tuple(args.caption_keys.split(",")) if args.caption_keys else None
    source = args.folder or args.manifest or args.official
    if source is not None and not Path(source).exists():
        raise FileNotFoundError(f"no such {'file' if args.manifest else 'folder'}: {source}")
    if args.folder:
        items, total = folder_items(args.folder, keys or ("caption", "prompt")), None
    elif args.manifest:
        items, total = manifest_items(args.manifest, keys or ("caption",)), None
    elif args.official:
        items, total = official_items(args.official, args.image_dir, args.json_dir, keys or OFFICIAL_CAPTION_KEYS), None
    else:
        items = shapes_items(args.shapes, args.shapes_split, args.shapes_seed, args.shapes_size, args.shapes_texture)
        total = args.shapes
    opts = PackOptions(shard_size=args.shard_size, max_side=args.max_side, min_side=args.min_side,
                       keep_original=args.keep_original, workers=args.workers)
    start = time.time()
    with tqdm(total=total, unit="img", desc="packing", file=sys.stderr) as bar:
        summary = pack(items, args.out, opts, progress=bar.update)
    report_skipped(summary.pop("skipped_items"))
    elapsed = time.time() - start
    summary["seconds"] = round(elapsed, 2)
    inputs = summary["packed"] + sum(summary["skipped"].values())
    written = summary.pop("inputs_written")  # the speed of this run: reused shards cost no time
    # From the unrounded time: a pack under 5 ms rounded to 0.00 s and reported no speed, as if nothing was written.
    summary["images_per_s"] = round(written / elapsed, 1) if written and elapsed > 0 else None
    print(json.dumps(summary))
    if source is not None and inputs == 0 and summary["shards_reused"] == 0:  # a wrong path or layout
        expected = (f"images ({', '.join(IMAGE_EXTS)}) with .txt/.json captions" if args.folder else
                    "rows with an 'image' column" if args.manifest else f"{args.json_dir}/*.json records")
        raise cli.InputError(f"nothing to pack in {source}: expected {expected}")
    if inputs and not summary["packed"]:  # e.g. --min-side above every image: no data, not a finished pack
        raise cli.InputError(f"every input was skipped ({summary['skipped']}); nothing was packed into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
