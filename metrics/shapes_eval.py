"""Generate for held-out shapes prompts with fixed seeds and judge the images (used by scripts/eval_shapes.py,
the quickstart and the sampler comparison)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from metrics.shapes_judge import judge, summarize
from utils.data.shapes import ShapesSample, make_sample, render


def heldout_samples(count: int, seed: int = 0) -> list[ShapesSample]:
    """``count`` held-out scenes: half one-object, half two-object with a relation."""
    return [make_sample(i, "heldout", seed, kind="one" if i % 2 == 0 else "two") for i in range(count)]


def reference_images(samples: list[ShapesSample], size: int) -> torch.Tensor:
    """The scenes rendered as the models take them: (N, 3, size, size) in [-1, 1]."""
    img = torch.from_numpy(np.stack([np.asarray(render(s, size), dtype=np.float32) for s in samples]))
    return img.permute(0, 3, 1, 2).contiguous().div_(127.5).sub_(1)


@torch.no_grad()
def reference_tokens(pipe, samples: list[ShapesSample], forced_scales: int):
    """``keep_tokens``/``keep`` that force the first ``forced_scales`` scales of every image to the VQ-VAE tokens
    of the scene's rendered reference image (the ground truth), for a per-scale ceiling analysis."""
    tokens = pipe.vqvae.img_to_idx(reference_images(samples, pipe.vqvae.cfg.image_size).to(pipe.device))
    keep = [torch.full_like(t, si < forced_scales, dtype=torch.bool) for si, t in enumerate(tokens)]
    return tokens, keep


def evaluate_pipeline(pipe, count: int = 200, seed: int = 0, batch_size: int = 16, forced_scales: int = 0,
                      **sampling) -> dict:
    """Images for the held-out prompts (batch b seeded with seed + b), judged. Returns the summary plus the
    per-prompt rows ``{"prompt", "kind", "verdict"}`` and the images (key ``"images"``, not serialisable).
    ``forced_scales`` > 0: scales below it come from the reference images (``reference_tokens``), the model
    generates the rest; with every scale forced the images are the VQ-VAE's reconstructions."""
    samples = heldout_samples(count, seed)
    prompts = [(s.caption, s.kind) for s in samples]
    rows, images = [], []
    for b, start in enumerate(range(0, count, batch_size)):
        chunk = prompts[start:start + batch_size]
        forced = {}
        if forced_scales > 0:
            keep_tokens, keep = reference_tokens(pipe, samples[start:start + batch_size], forced_scales)
            forced = {"keep_tokens": keep_tokens, "keep": keep}
        for (prompt, kind), image in zip(chunk, pipe([p for p, _ in chunk], seed=seed + b, **sampling, **forced)):
            rows.append({"prompt": prompt, "kind": kind, "verdict": judge(image, prompt)})
            images.append(image)
    summary = summarize([r["verdict"] for r in rows], [r["kind"] for r in rows])
    return {"summary": summary, "rows": rows, "images": images}


def examples_sheet(images: list[Image.Image], rows: list[dict], path: Path, n: int = 16, cell: int = 128) -> None:
    """A grid of the first ``n`` images, each with its prompt and the judge's all-correct verdict (OK / NO; the
    default bitmap font has no check-mark glyphs)."""
    n = min(n, len(images))
    cols = 4
    sheet = Image.new("RGB", (cols * cell, ((n + cols - 1) // cols) * (cell + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % cols) * cell, (i // cols) * (cell + 30)
        sheet.paste(images[i].resize((cell, cell), Image.NEAREST), (x, y))
        ok = rows[i]["verdict"]["all_correct"]
        draw.rectangle((x, y, x + 17, y + 11), fill="white")
        draw.text((x + 2, y), "OK" if ok else "NO", fill=(0, 150, 0) if ok else (210, 0, 0))
        words, line, lines = rows[i]["prompt"].split(), "", []
        for w in words:  # wrap to the cell width (~21 characters of the default font)
            if len(line) + len(w) > 21:
                lines.append(line)
                line = ""
            line = (line + " " + w).strip()
        lines.append(line)
        draw.text((x + 2, y + cell + 1), "\n".join(lines[:2]), fill="black")
    sheet.save(path)
