#!/usr/bin/env python
"""Pre-compute the caption-embedding cache for packed LMDB data (every caption field, plus "").

    python scripts/cache_text.py --data data/shapes --config configs/shapes_star.json   # the run's text settings
    python scripts/cache_text.py --data data/laion --encoder hf-clip --encoder-path /models/sd21 --cache cache/

The cache is keyed by the encoder's identity (kind, weights, the tiny encoder's depth): training reads it only
with the same encoder, so ``--config`` (the run config's "text" section: encoder, path, tiny_layers, cache_dir)
is the safe way to name it; flags given as well override the file. Unreadable records are skipped and counted.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from tqdm import tqdm  # noqa: E402

from models.text_cache import CachedTextEncoder  # noqa: E402
from models.text_encoder import text_encoder_from_config  # noqa: E402
from trainer.config import TextConfig  # noqa: E402
from utils import cli  # noqa: E402
from utils.config import ConfigError, from_dict, to_dict  # noqa: E402
from utils.data.records import Shard, find_shards  # noqa: E402


def text_settings(args) -> dict:
    """The "text" section of --config (if any) with the flags given on top, as a run config holds it."""
    text = {}
    if args.config:
        try:
            text = json.loads(Path(args.config).read_text()).get("text", {})
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read the run config {args.config}: {e}") from None
    flags = {"encoder": args.encoder, "path": args.encoder_path, "tiny_layers": args.tiny_layers,
             "cache_dir": args.cache}
    text = to_dict(from_dict(TextConfig, {**text, **{k: v for k, v in flags.items() if v is not None}}, "text."))
    if not text["cache_dir"]:
        raise ConfigError("no cache directory: pass --cache DIR (or a --config whose text.cache_dir is set)")
    if not args.config and args.encoder is None:
        raise ConfigError("name the encoder: --config <run config> or --encoder KIND")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="LMDB shard folders")
    p.add_argument("--config", help="a run config: its text section names encoder, weights and cache")
    p.add_argument("--encoder", choices=["hf-clip", "open_clip", "t5", "tiny", "minilm"])
    p.add_argument("--encoder-path", default=None)
    p.add_argument("--tiny-layers", type=cli.positive_int, help="depth of the tiny encoder (text.tiny_layers)")
    p.add_argument("--cache", help="the cache directory (text.cache_dir)")
    p.add_argument("--batch", type=cli.positive_int, default=256)
    p.add_argument("--device", type=cli.device_arg, default="cpu")
    args = p.parse_args(argv)
    text = text_settings(args)
    shards = {root: find_shards(root) for root in args.data}  # checked before the encoder loads
    for root, paths in shards.items():
        if not paths:  # the usual mistake: a parent folder, or a pack still being written
            raise cli.InputError(f"no complete LMDB shards in {root}: pass the folder test_pack.py --out wrote")
    cache = CachedTextEncoder(text_encoder_from_config(text).to(args.device), text["cache_dir"])
    start = time.time()
    seen: set[str] = {""}
    batch, skipped = [""], 0
    with tqdm(unit="caption", desc="caching", file=sys.stderr) as bar:
        for paths in shards.values():
            for path in paths:
                shard = Shard(path)
                for i in range(len(shard)):
                    try:
                        captions = shard.read(i)[0]["captions"]
                    except Exception as e:  # a corrupt record: skip and count, as training does
                        skipped += 1
                        bar.write(f"skipping unreadable record {i} of {path} ({type(e).__name__}: {e})")
                        continue
                    for caption in captions.values():
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
                      "skipped_records": skipped, "encoder": cache.encoder.identity, "cache": text["cache_dir"],
                      "seconds": round(time.time() - start, 2)}))
    cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
