#!/usr/bin/env python
"""Pre-compute the caption-embedding cache for packed LMDB data (every caption field, plus "").

    python scripts/cache_text.py --data data/shapes --encoder tiny --cache outputs/text_cache
    python scripts/cache_text.py --data data/laion --encoder hf-clip --encoder-path /models/sd21 --cache cache/

Training with the same encoder and cache directory then never runs the text encoder for these captions.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from tqdm import tqdm  # noqa: E402

from models.text_cache import CachedTextEncoder  # noqa: E402
from models.text_encoder import build_text_encoder  # noqa: E402
from utils import cli  # noqa: E402
from utils.data.records import Shard, find_shards  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="LMDB shard folders")
    p.add_argument("--encoder", required=True, choices=["hf-clip", "open_clip", "t5", "tiny", "minilm"])
    p.add_argument("--encoder-path", default=None)
    p.add_argument("--cache", required=True)
    p.add_argument("--batch", type=cli.positive_int, default=256)
    p.add_argument("--device", type=cli.device_arg, default="cpu")
    args = p.parse_args()
    encoder = build_text_encoder(args.encoder, args.encoder_path).to(args.device)
    cache = CachedTextEncoder(encoder, args.cache)
    start = time.time()
    seen: set[str] = {""}
    batch = [""]
    with tqdm(unit="caption", desc="caching", file=sys.stderr) as bar:
        for root in args.data:
            for path in find_shards(root):
                shard = Shard(path)
                for i in range(len(shard)):
                    for caption in shard.read(i)[0]["captions"].values():
                        caption = caption.strip()
                        if caption not in seen:
                            seen.add(caption)
                            batch.append(caption)
                    if len(batch) >= args.batch:
                        cache.encode(batch)
                        bar.update(len(batch))
                        batch = []
        if batch:
            cache.encode(batch)
            bar.update(len(batch))
    print(json.dumps({"captions": len(seen), "entries": len(cache), "newly_encoded": cache.misses,
                      "seconds": round(time.time() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
