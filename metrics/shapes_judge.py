"""Automatic judge for the shapes data set: does an image match its prompt, attribute by attribute?

No learned model: pixels are assigned to the nearest palette colour (or background), each colour's connected
components are measured (area, bounding box, centroid) and the largest one stands for the object of that colour.
Shape from the fill ratio area / bbox-area (square ~1, circle ~pi/4, triangle ~1/2), size from the bbox side,
position from the centroid's 3x3 cell, relations from centroid offsets. Attributes: count, color, shape, size
(only when the prompt names it), position (one object), relation (two objects), and all_correct.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from utils.data.shapes import BACKGROUND, CELLS, PALETTE, RELATIONS, SHAPES, SIZE_FRACTION, cell_of

ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation")
_COLORS = "|".join(PALETTE)
_SHAPES = "|".join(SHAPES)
_ONE = re.compile(rf"^(?:a|there is a) (?:(small|large) )?({_COLORS}) ({_SHAPES}) (?:at|in) the ({'|'.join(CELLS)})$")
_TWO = re.compile(rf"^a ({_COLORS}) ({_SHAPES}) ({'|'.join(RELATIONS)}) a ({_COLORS}) ({_SHAPES})$")
_THREE = re.compile(rf"^a ({_COLORS}) ({_SHAPES}), a ({_COLORS}) ({_SHAPES}) and a ({_COLORS}) ({_SHAPES})$")


@dataclass
class Blob:
    color: str
    area: int
    width: int
    height: int
    cx: float  # centroid, fractions of the image side
    cy: float

    @property
    def fill(self) -> float:
        return self.area / max(self.width * self.height, 1)

    @property
    def shape(self) -> str:
        return "triangle" if self.fill < 0.68 else "circle" if self.fill < 0.9 else "square"


def parse_prompt(prompt: str) -> dict:
    """The structured content of a shapes caption; raises ValueError for text the templates cannot write."""
    p = prompt.strip().lower()
    if m := _ONE.match(p):
        return {"kind": "one", "objects": [{"color": m[2], "shape": m[3], "size": m[1]}], "cell": m[4]}
    if m := _TWO.match(p):
        return {"kind": "two", "objects": [{"color": m[1], "shape": m[2], "size": None},
                                           {"color": m[4], "shape": m[5], "size": None}], "relation": m[3]}
    if m := _THREE.match(p):
        return {"kind": "three", "objects": [{"color": m[i], "shape": m[i + 1], "size": None} for i in (1, 3, 5)]}
    raise ValueError(f"not a shapes prompt: {prompt!r}")


def find_blobs(image: Image.Image | np.ndarray, min_area_fraction: float = 0.004) -> list[Blob]:
    """Connected components of every palette colour, largest first, ignoring specks."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    size = rgb.shape[0]
    refs = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)   # (1 + colours, 3)
    dist = ((rgb[:, :, None, :] - refs[None, None]) ** 2).sum(-1)        # (H, W, 1 + colours)
    label = dist.argmin(-1)
    label[dist.min(-1) > 90.0 ** 2] = 0                                  # far from every colour: background
    blobs = []
    for ci, name in enumerate(PALETTE, start=1):
        comps, n = ndimage.label(label == ci)
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            area = int((comps[sl] == k).sum())
            if area < min_area_fraction * size * size:
                continue
            ys, xs = np.nonzero(comps == k)
            blobs.append(Blob(name, area, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start,
                              (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size))
    return sorted(blobs, key=lambda b: -b.area)


def judge(image: Image.Image | np.ndarray, prompt: str) -> dict[str, bool | None]:
    """Per-attribute verdicts (None = not applicable to this prompt) and ``all_correct``."""
    spec = parse_prompt(prompt)
    blobs = find_blobs(image)
    size = (image.size[0] if isinstance(image, Image.Image) else image.shape[1])
    objects = spec["objects"]
    found = [next((b for b in blobs if b.color == o["color"]), None) for o in objects]
    out: dict[str, bool | None] = dict.fromkeys(ATTRIBUTES)
    out["count"] = len(blobs) == len(objects)
    out["color"] = all(b is not None for b in found)
    out["shape"] = all(b is not None and b.shape == o["shape"] for b, o in zip(found, objects))
    if any(o["size"] for o in objects):
        threshold = (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2 * size
        out["size"] = all(b is not None and (max(b.width, b.height) >= threshold) == (o["size"] == "large")
                          for b, o in zip(found, objects) if o["size"])
    if spec["kind"] == "one":
        out["position"] = found[0] is not None and cell_of(found[0].cx, found[0].cy) == spec["cell"]
    if spec["kind"] == "two":
        a, b = found
        margin = 0.08
        rel = spec["relation"]
        out["relation"] = a is not None and b is not None and {
            "to the left of": b.cx - a.cx > margin, "to the right of": a.cx - b.cx > margin,
            "above": b.cy - a.cy > margin, "below": a.cy - b.cy > margin}[rel]
    out["all_correct"] = all(v for v in out.values() if v is not None)
    return out


def summarize(verdicts: list[dict], kinds: list[str] | None = None) -> dict:
    """Accuracy per attribute (over prompts where it applies) and all-correct, overall and per prompt kind."""
    def acc(rows):
        res = {}
        for key in (*ATTRIBUTES, "all_correct"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                res[key] = sum(vals) / len(vals)
        res["n"] = len(rows)
        return res
    out = {"overall": acc(verdicts)}
    if kinds is not None:
        for kind in sorted(set(kinds)):
            out[kind] = acc([v for v, k in zip(verdicts, kinds) if k == kind])
    return out


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: probability, if A and B were equally good, of a split of the discordant
    prompts at least this uneven (binomial with p = 1/2 over ``only_a + only_b`` trials)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparison(rows_a: list[dict], rows_b: list[dict], kinds: list[str] | None = None) -> dict:
    """Verdicts of two runs on the same prompts and seeds, prompt by prompt: per attribute (and per prompt kind)
    how many prompts only A / only B gets right, the accuracy difference A - B and McNemar's exact p-value.
    Pairing removes the prompt-to-prompt variance that makes two separate accuracies hard to compare."""
    if len(rows_a) != len(rows_b):
        raise ValueError(f"paired comparison needs the same prompts: {len(rows_a)} != {len(rows_b)} verdicts")
    groups = {"overall": list(range(len(rows_a)))}
    if kinds is not None:
        for kind in sorted(set(kinds)):
            groups[kind] = [i for i, k in enumerate(kinds) if k == kind]
    out = {}
    for group, index in groups.items():
        res = {}
        for key in (*ATTRIBUTES, "all_correct"):
            pairs = [(rows_a[i][key], rows_b[i][key]) for i in index if rows_a[i].get(key) is not None]
            if not pairs:
                continue
            only_a = sum(bool(a) and not b for a, b in pairs)
            only_b = sum(bool(b) and not a for a, b in pairs)
            res[key] = {"n": len(pairs), "only_a": only_a, "only_b": only_b,
                        "difference": (only_a - only_b) / len(pairs), "p_value": mcnemar_p(only_a, only_b)}
        out[group] = res
    return out


def format_table(summary: dict) -> str:
    """A plain-text table: one row per group, one column per attribute."""
    cols = [*ATTRIBUTES, "all_correct", "n"]
    lines = ["group    " + " ".join(f"{c:>11}" for c in cols)]
    for group, res in summary.items():
        cells = [(f"{res[c]:.3f}" if c != "n" else str(res[c])) if c in res else "-" for c in cols]
        lines.append(f"{group:<8} " + " ".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)


def judge_folder(folder: str | Path) -> dict:
    """Judge every ``*.png`` in a folder whose prompt is in the sidecar ``.json`` (key "prompt") or ``.txt``."""
    verdicts, kinds = [], []
    for png in sorted(Path(folder).glob("*.png")):
        side_json, side_txt = png.with_suffix(".json"), png.with_suffix(".txt")
        if side_json.is_file():
            prompt = json.loads(side_json.read_text())["prompt"]
        elif side_txt.is_file():
            prompt = side_txt.read_text().strip()
        else:
            continue
        verdicts.append(judge(Image.open(png), prompt))
        kinds.append(parse_prompt(prompt)["kind"])
    return summarize(verdicts, kinds)
