#!/usr/bin/env python
"""MJHQ-30K evaluation as in the paper: generate for every prompt, then FID, CLIP score and CMMD per category.

    python scripts/eval_mjhq.py --meta MJHQ/meta_data.json --images MJHQ/mjhq30k_imgs --ckpt PIPELINE_DIR \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --clip-weights ViT-L-14.pt --out eval/mjhq
    torchrun --nproc_per_node=8 scripts/eval_mjhq.py ...          # generation sharded over ranks, resumable

Layout (user-supplied, nothing is downloaded): meta_data.json = {name: {"category": .., "prompt": ..}} and
images/<category>/<name>.jpg. Generated images go to OUT/generated/<category>/<name>.png; existing files are
kept, so an interrupted run resumes. OUT/generated/generation.json records the model and sampling settings that
made them: a run with other ones into the same --out is refused (it would score the old images under the new
settings), and metrics.json reports the recorded ones. Defaults are the paper's protocol: cfg 4 on the linear
ramp, top-k 4096, top-p 0.8, sampler on with the official '1024' schedule. References are resized (short side) and
centre-cropped to the generation size (the official script crops at random). Writes OUT/metrics.json and OUT/radar.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from metrics.clip_score import ClipEmbedder, clip_score, find_clip_weights  # noqa: E402
from metrics.cmmd import cmmd  # noqa: E402
from metrics.fid import InceptionFeatures, feature_stats, find_inception_weights, frechet_distance  # noqa: E402
from models.pipeline import StarPipeline, add_pipeline_args, check_seed  # noqa: E402
from models.sampler import SCHEDULES  # noqa: E402
from utils import cli, dist  # noqa: E402


def read_meta(path: Path, per_category: int | None = None) -> list[dict]:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or not meta:
        raise cli.InputError(f"{path} holds no prompts: MJHQ's meta_data.json maps names to "
                             "{\"category\": .., \"prompt\": ..}")
    items = [{"name": k, "category": v["category"], "prompt": v["prompt"]} for k, v in sorted(meta.items())]
    if per_category:
        kept, counts = [], {}
        for it in items:
            counts[it["category"]] = counts.get(it["category"], 0) + 1
            if counts[it["category"]] <= per_category:
                kept.append(it)
        items = kept
    return items


def generate(pipe: StarPipeline, items: list[dict], gen_dir: Path, args) -> int:
    """This rank's share (items r, r+world, ...) in batches; item i is drawn with its own generator seeded by
    --seed + i, so neither the batch size nor a resumed run changes an image. Skips images already on disk."""
    rank, world = dist.get_rank(), dist.get_world_size()
    todo = [(i, it) for i, it in enumerate(items) if i % world == rank
            and not (gen_dir / it["category"] / f"{it['name']}.png").is_file()]
    for start in range(0, len(todo), args.batch_size):
        indices, batch = zip(*todo[start:start + args.batch_size])
        images = pipe([it["prompt"] for it in batch], cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                      guidance_schedule=args.guidance, seed=[args.seed + i for i in indices],
                      sampler_schedule=args.sampler_schedule,
                      use_sampler=not args.no_sampler and pipe.sampler is not None)
        for it, image in zip(batch, images):
            path = gen_dir / it["category"] / f"{it['name']}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.png")
            image.save(tmp)
            tmp.replace(path)
    return len(todo)


GENERATION_RECORD = "generation.json"
# What decides the generated images (the batch size does not: one generator per image).
GENERATION_KEYS = ("ckpt", "preset", "vae", "text_encoder", "cfg", "top_k", "top_p", "guidance", "no_sampler",
                   "sampler_schedule", "seed")


def generation_record(args) -> dict:
    return {k: getattr(args, k) for k in GENERATION_KEYS}


def check_generation_record(gen_dir: Path, args) -> None:
    """Refuse to add to (or score) images made with other settings; record this run's settings (rank 0) when
    OUT/generated has none yet."""
    path = gen_dir / GENERATION_RECORD
    ours = generation_record(args)
    if path.is_file():
        changed = cli.settings_changes(json.loads(path.read_text()), ours, path_keys=("ckpt", "vae"))
        if changed:
            raise cli.InputError(f"{gen_dir} holds images generated otherwise ({'; '.join(changed)}): use another "
                                 "--out, or delete that folder to generate them again")
    elif dist.get_rank() == 0:
        gen_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ours, indent=2))
        tmp.replace(path)


def load_reference(path: Path, size: int) -> Image.Image:
    im = Image.open(path).convert("RGB")
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))), Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images])


def evaluate(items: list[dict], images_root: Path, gen_dir: Path, size: int, inception, clip, batch: int = 32) -> dict:
    """FID (Inception features), CLIP score and CMMD (CLIP image embeddings), per category and overall."""
    feats = {"gen": [], "ref": []}
    clip_img = {"gen": [], "ref": []}
    text = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        gen = [Image.open(gen_dir / it["category"] / f"{it['name']}.png").convert("RGB") for it in chunk]
        ref = [load_reference(images_root / it["category"] / f"{it['name']}.jpg", size) for it in chunk]
        for key, ims in (("gen", gen), ("ref", ref)):
            feats[key].append(inception(_to_tensor(ims)))
            clip_img[key].append(clip.images(ims))
        text.append(clip.texts([it["prompt"] for it in chunk]))
    feats = {k: np.concatenate(v) for k, v in feats.items()}
    clip_img = {k: torch.cat(v) for k, v in clip_img.items()}
    text = torch.cat(text)
    cats = [it["category"] for it in items]
    groups = {c: [i for i, x in enumerate(cats) if x == c] for c in sorted(set(cats))}
    groups["overall"] = list(range(len(items)))
    out: dict = {"fid": {}, "clip_score": {}, "cmmd": {}, "count": {}}
    for name, idx in groups.items():
        out["count"][name] = len(idx)
        out["fid"][name] = frechet_distance(*feature_stats(feats["gen"][idx]), *feature_stats(feats["ref"][idx]))
        out["clip_score"][name] = clip_score(clip_img["gen"][idx], text[idx])
        out["cmmd"][name] = cmmd(clip_img["gen"][idx], clip_img["ref"][idx])
    return out


def radar_plot(metrics: dict, path: Path) -> None:
    """One polar panel per metric, categories around the circle (as the paper's figure)."""
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend or figure registry
    cats = [c for c in metrics["fid"] if c != "overall"]
    angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False).tolist()
    fig = Figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 3, subplot_kw={"projection": "polar"})
    for ax, key in zip(axes, ("fid", "clip_score", "cmmd")):
        values = [metrics[key][c] for c in cats]
        ax.plot(angles + angles[:1], values + values[:1], marker="o")
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.2)
        ax.set_xticks(angles)
        ax.set_xticklabels(cats, fontsize=8)
        ax.set_title(f"{key} (overall {metrics[key]['overall']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def check_scoring_inputs(items: list[dict], args) -> None:
    """The Inception and CLIP weights and every reference image the scoring reads, before any generation."""
    find_inception_weights(args.inception_weights)  # FileNotFoundError naming the file to fetch
    find_clip_weights(args.clip_weights, args.clip_model)
    missing = [f"{it['category']}/{it['name']}.jpg" for it in items
               if not (args.images / it["category"] / f"{it['name']}.jpg").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(items)} reference images are missing under {args.images} "
                                f"(first: {missing[0]}): --images is MJHQ's image root, <category>/<name>.jpg")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meta", required=True, type=Path, help="MJHQ meta_data.json")
    p.add_argument("--images", required=True, type=Path, help="MJHQ image root (<category>/<name>.jpg)")
    p.add_argument("--out", required=True, type=Path)
    add_pipeline_args(p, "pipeline directory or official .pth (with --preset, --vae, --text-encoder)")
    p.add_argument("--per-category", type=cli.positive_int, help="only the first N prompts of each category")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=4096)
    p.add_argument("--top-p", type=float, default=0.8)
    # The paper's ramp, not the pipeline's default: a shapes pipeline records "constant" for its own task.
    p.add_argument("--guidance", default="linear", help="linear | constant | window:i:j | t0,t1,... (default linear)")
    p.add_argument("--no-sampler", action="store_true")
    p.add_argument("--sampler-schedule", default="official-1024", choices=SCHEDULES)
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--batch-size", type=cli.positive_int, default=6)
    p.add_argument("--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-weights", help="local open_clip checkpoint of --clip-model")
    p.add_argument("--skip-generation", action="store_true", help="only score images already in OUT/generated")
    return p.parse_args(argv)


def main(argv=None, pipe: StarPipeline | None = None, extractors: tuple | None = None) -> int:
    """``pipe`` and ``extractors`` = (inception, clip) let callers (tests) pass ready-made objects."""
    args = parse_args(argv)
    device = dist.init_distributed([])
    if dist.get_world_size() > 1 and device.type == "cuda":
        args.device = str(device)
    items = read_meta(args.meta, args.per_category)
    for i in (0, len(items) - 1):  # image i is drawn with seed --seed + i: both ends in range, all are
        try:
            check_seed(args.seed + i)
        except ValueError as e:
            raise cli.InputError(f"--seed: {e}") from None
    gen_dir = args.out / "generated"
    if extractors is None:  # hours of generation must not end in a missing file: check what scoring reads now
        check_scoring_inputs(items, args)
    if args.skip_generation:
        missing = [it for it in items if not (gen_dir / it["category"] / f"{it['name']}.png").is_file()]
        if missing:
            raise cli.InputError(f"--skip-generation: {len(missing)} of {len(items)} generated images are missing "
                                 f"under {gen_dir} (first: {missing[0]['category']}/{missing[0]['name']}.png)")
    if pipe is None and not args.skip_generation:
        if args.ckpt is None:
            raise cli.InputError("--ckpt is required to generate (or pass --skip-generation)")
        pipe = StarPipeline.from_args(args)
    if pipe is not None:  # sampling settings checked before the first batch
        pipe.generation_settings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, guidance_schedule=args.guidance)
    if not args.skip_generation:
        check_generation_record(gen_dir, args)
        generated = generate(pipe, items, gen_dir, args)
        print(json.dumps({"rank": dist.get_rank(), "generated": generated}), flush=True)
    dist.barrier()
    if dist.get_rank() == 0:
        if extractors is None:
            extractors = (InceptionFeatures(args.inception_weights, args.device),
                          ClipEmbedder(args.clip_model, args.clip_weights, device=args.device))
        first = gen_dir / items[0]["category"] / f"{items[0]['name']}.png"
        size = Image.open(first).size[0]
        metrics = evaluate(items, args.images, gen_dir, size, *extractors)
        metrics["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        record = gen_dir / GENERATION_RECORD  # what made the images (with --skip-generation: an earlier run)
        metrics["generation"] = json.loads(record.read_text()) if record.is_file() else None
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        radar_plot(metrics, args.out / "radar.png")
        print(json.dumps({k: metrics[k]["overall"] for k in ("fid", "clip_score", "cmmd")}))
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
