"""Generate for held-out shapes prompts with fixed seeds and judge the images (used by scripts/eval_shapes.py,
the quickstart and the sampler comparison)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from metrics.shapes_judge import judge, summarize
from utils.data.shapes import make_sample


def heldout_prompts(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, kind) for ``count`` held-out prompts: half one-object, half two-object with a relation."""
    out = []
    for i in range(count):
        sample = make_sample(i, "heldout", seed, kind="one" if i % 2 == 0 else "two")
        out.append((sample.caption, sample.kind))
    return out


def evaluate_pipeline(pipe, count: int = 200, seed: int = 0, batch_size: int = 16, **sampling) -> dict:
    """Images for the held-out prompts (batch b seeded with seed + b), judged. Returns the summary plus the
    per-prompt rows ``{"prompt", "kind", "verdict"}`` and the images (key ``"images"``, not serialisable)."""
    prompts = heldout_prompts(count, seed)
    rows, images = [], []
    for b, start in enumerate(range(0, count, batch_size)):
        chunk = prompts[start:start + batch_size]
        for (prompt, kind), image in zip(chunk, pipe([p for p, _ in chunk], seed=seed + b, **sampling)):
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
