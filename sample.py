#!/usr/bin/env python
"""Generate images with a STAR pipeline.

    python sample.py --ckpt outputs/quickstart/pipeline --prompt "a red circle at the top left" --seed 0
    python sample.py --ckpt DIR --prompts prompts.txt --out samples/ --grid          # one prompt per line
    python sample.py --ckpt DIR --prompts items.jsonl --out samples/                 # {"prompt": .., "seed": ..}
    torchrun --nproc_per_node=8 sample.py --ckpt DIR --prompts big.jsonl --out samples/ --batch-size 16  # sharded
    python sample.py --ckpt DIR --prompts evaluation_metadata.jsonl --layout geneval --num-images 4 --out geneval/
    python sample.py --ckpt DIR --prompt "a blue square" --edit-image in.png --edit-mask mask.png
    python sample.py --ckpt star.pth --preset star-d30-1024 --vae vae_ch160v4096z32.pth \\
        --text-encoder hf-clip --text-encoder-path /models/clip-vit-h --prompt "..."

Each item i writes OUT/{i:06d}_{k}.png (k < --num-images) and OUT/{i:06d}.json (prompt, seed and every
setting). ``--layout geneval`` writes GenEval's folder layout instead, for its ``evaluate_images.py``:
OUT/{i:05d}/metadata.jsonl (the item's line of GenEval's evaluation_metadata.jsonl),
OUT/{i:05d}/samples/{k:04d}.png and OUT/{i:05d}/item.json (ours: seed and settings). Item i is generated with
seed (item seed or --seed + i) and a random generator of its own: the same command gives the same images however
the items are sharded over ranks or batched (``--batch-size``; up to floating-point rounding, which can differ
between batch sizes and flip a rare token). Items whose files exist are skipped, so an interrupted run resumes;
an item there made with another prompt, seed, setting or model is an error (``--overwrite`` makes it again).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from models.pipeline import StarPipeline, add_pipeline_args, check_seed
from models.sampler import SCHEDULES
from utils import cli, dist

LAYOUTS = ("flat", "geneval")


def item_files(layout: str, i: int, num_images: int) -> tuple[str, list[str]]:
    """(the item's JSON, written last: it marks the item done; its images), relative to --out."""
    if layout == "geneval":
        return f"{i:05d}/item.json", [f"{i:05d}/samples/{k:04d}.png" for k in range(num_images)]
    return f"{i:06d}.json", [f"{i:06d}_{k}.png" for k in range(num_images)]


def read_items(args) -> list[dict]:
    """[{"prompt", "seed"?, ...}] from --prompt or a .txt / .jsonl file."""
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:  # a run that "finishes" with nothing generated hides the mistake
        raise cli.InputError(f"no prompts in {path}: one prompt per line (.txt) or one JSON object per line (.jsonl)")
    if path.suffix == ".jsonl":
        items = []
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise cli.InputError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise cli.InputError(f"{path}:{n}: each line needs a JSON object with a 'prompt' string")
            if "seed" in item and (not isinstance(item["seed"], int) or isinstance(item["seed"], bool)):
                raise cli.InputError(f"{path}:{n}: 'seed' must be an integer, got {item['seed']!r}")
            items.append(item)
        return items
    return [{"prompt": line.strip()} for line in lines]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p, "our pipeline directory, or an official .pth (with --preset); "
                         "omitted: the embedded random tiny model (plumbing only)")
    what = p.add_argument_group("prompts").add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt")
    what.add_argument("--prompts", help=".txt (one prompt per line) or .jsonl ({'prompt', optional 'seed'})")
    gen = p.add_argument_group("sampling")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--cfg", type=float, help="guidance weight (default: the pipeline's, official 4.0)")
    gen.add_argument("--top-k", type=int, help="0 = off (default: the pipeline's, official 900)")
    gen.add_argument("--top-p", type=float, help="0 = off (default: the pipeline's, official 0.95)")
    gen.add_argument("--guidance", help="linear | constant | window:i:j | t0,t1,... (one weight per scale; "
                     "default: the pipeline's, official linear)")
    gen.add_argument("--no-sampler", action="store_true", help="do not use the sampler head even if present")
    gen.add_argument("--sampler-schedule", default="default", choices=SCHEDULES)
    gen.add_argument("--seed", type=int, default=0, help="item i uses seed + i unless its JSONL line has 'seed'")
    gen.add_argument("--num-images", type=cli.positive_int, default=1, help="images per prompt")
    gen.add_argument("--batch-size", type=cli.positive_int, default=1,
                     help="prompts per forward pass (each keeps its own seed: the images do not depend on it)")
    gen.add_argument("--edit-image", help="in/out-painting: the image to edit (with --edit-mask and --prompt)")
    gen.add_argument("--edit-mask", help="white = regenerate, black = keep")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="samples")
    out.add_argument("--layout", default="flat", choices=LAYOUTS,
                     help="flat: OUT/{i:06d}_{k}.png; geneval: OUT/{i:05d}/samples/{k:04d}.png + metadata.jsonl")
    out.add_argument("--grid", action="store_true", help="also write grid.png of all images (rank 0)")
    out.add_argument("--overwrite", action="store_true", help="regenerate items whose files exist")
    args = p.parse_args(argv)
    if bool(args.edit_image) != bool(args.edit_mask):
        p.error("--edit-image and --edit-mask go together")
    if args.edit_image and args.prompt is None:
        p.error("editing takes one --prompt")
    return args


def open_image(path: str, flag: str) -> Image.Image:
    """The image at ``path``, read now: a missing or unreadable file is an input error before any model loads."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise cli.InputError(f"{flag}: no such file: {path}") from None
    except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError; truncated files too
        raise cli.InputError(f"{flag}: not a readable image: {path} ({e})") from None


def load_pipeline(args) -> StarPipeline:
    if args.ckpt is None:
        print("[sample] no --ckpt: using the embedded random tiny model (images are noise)", file=sys.stderr)
        return StarPipeline.tiny_random(device=args.device)
    return StarPipeline.from_args(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = dist.init_distributed([])  # torchrun: one shard per rank, each on its own GPU
    rank, world = dist.get_rank(), dist.get_world_size()
    if world > 1 and device.type == "cuda":
        args.device = str(device)
    items = read_items(args)
    for i in range(len(items)):  # before the model loads: torch's error for a huge seed came mid-run
        try:
            check_seed(item_seed(args, items, i))
        except ValueError as e:
            raise cli.InputError(f"item {i}: {e}") from None
    edit = (open_image(args.edit_image, "--edit-image"), open_image(args.edit_mask, "--edit-mask")) \
        if args.edit_image else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args)
    sampling = pipe.generation_settings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                        guidance_schedule=args.guidance)  # unset: the pipeline's defaults
    settings = dict(negative_prompt=args.negative_prompt, **sampling,
                    use_sampler=not args.no_sampler and pipe.sampler is not None,
                    sampler_schedule=args.sampler_schedule, num_images=args.num_images)
    # Rank r takes items r, r+world, ...: no duplicates, no gaps. Items whose metadata exists are done.
    todo = [i for i in range(rank, len(items), world) if args.overwrite or not item_done(out, i, args, items, settings)]
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        seeds = [item_seed(args, items, i) for i in batch]
        if edit is not None:  # one --prompt, so one item
            images = pipe.edit(items[batch[0]]["prompt"], *edit, seed=seeds[0], **settings)
        else:  # one generator per item: an item's images are the same whatever else is in the batch
            images = pipe([items[i]["prompt"] for i in batch], seed=seeds, progress=rank == 0, **settings)
        for j, i in enumerate(batch):
            meta_file, files = item_files(args.layout, i, args.num_images)
            for name, image in zip(files, images[j * args.num_images:(j + 1) * args.num_images]):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                image.save(out / name)
            if args.layout == "geneval":  # what evaluate_images.py reads: the item's own metadata, one object
                (out / meta_file).with_name("metadata.jsonl").write_text(json.dumps(items[i]))
            meta = {**item_record(args, items, i, settings), "files": files, "batch_size": args.batch_size}
            meta_path = out / meta_file
            tmp = meta_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(meta, indent=2))
            tmp.replace(meta_path)  # written last: an item counts as done only with all its images on disk
    dist.barrier()
    if args.grid and rank == 0:
        write_grid(out, [f for i in range(len(items)) for f in item_files(args.layout, i, args.num_images)[1]])
    # one write per report: ranks share stdout under torchrun
    sys.stdout.write(json.dumps({"rank": rank, "generated": len(todo), "items": len(items), "out": str(out)}) + "\n")
    sys.stdout.flush()
    dist.destroy()
    return 0


def item_seed(args, items: list[dict], i: int) -> int:
    return int(items[i].get("seed", args.seed + i))


def item_record(args, items: list[dict], i: int, settings: dict) -> dict:
    """What makes item i's images (its line, seed, sampling settings, model, edit inputs): kept in its JSON."""
    return {**items[i], "index": i, "seed": item_seed(args, items, i), **settings, "ckpt": args.ckpt,
            "preset": args.preset, "vae": args.vae, "text_encoder": args.text_encoder,
            "edit_image": args.edit_image, "edit_mask": args.edit_mask}


PATH_KEYS = ("ckpt", "vae", "edit_image", "edit_mask")


def item_done(out: Path, i: int, args, items: list[dict], settings: dict) -> bool:
    """Whether item i is on disk from a run with this one's prompt, seed and settings. One made otherwise (other
    --cfg, an edited prompt file, another --ckpt) is an error, not a silent reuse; an unreadable JSON (a crash
    can leave none half-written, but a user can) is made again."""
    meta_path = out / item_files(args.layout, i, args.num_images)[0]
    if not meta_path.is_file():
        return False
    try:
        saved = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    expected = json.loads(json.dumps(item_record(args, items, i, settings)))  # lists for tuples, as on disk
    changed = cli.settings_changes(saved, expected, PATH_KEYS)
    if changed:
        raise cli.InputError(f"{meta_path} was generated otherwise ({'; '.join(changed)}): write to another --out, "
                             "or pass --overwrite to make its items again")
    return True


def write_grid(out: Path, files: list[str]) -> None:
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.utils import make_grid, save_image
    paths = [out / f for f in files]
    tensors = [pil_to_tensor(Image.open(f).convert("RGB")).float() / 255 for f in paths if f.is_file()]
    if tensors:
        save_image(make_grid(tensors, nrow=min(8, len(tensors))), out / "grid.png")


if __name__ == "__main__":
    sys.exit(cli.run(main))
