"""The embedded "shapes" text-image data set: procedural, deterministic, judged automatically.

Each image holds 1-3 flat-coloured objects (circle / square / triangle, 6 palette colours, small / large) on a
plain or lightly textured background; the caption comes from one of several templates, e.g.
    "a small red circle at the top left"          (one object: colour, shape, optional size, 3x3 cell)
    "a blue square to the right of a yellow triangle"   (two objects and a spatial relation)
    "a red circle, a green square and a purple triangle" (three objects)
Same (split, index, seed) -> same sample. Held-out prompts are attribute combinations that never occur in the
training split: one-object (colour, shape, cell) triples and two-object (colour, shape, relation, colour,
shape) tuples selected by a fixed hash (``is_held_out``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (150, 60, 190), "orange": (245, 135, 30),
}
BACKGROUND = (232, 232, 232)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("to the left of", "to the right of", "above", "below")
# Object side as a fraction of the image side.
SIZE_FRACTION = {"small": 0.16, "large": 0.27}
HELD_OUT_PERCENT = 12


@dataclass
class ShapeObject:
    color: str
    shape: str
    size: str
    cx: float  # centre, fractions of the image side
    cy: float


@dataclass
class ShapesSample:
    caption: str
    objects: list[ShapeObject]
    kind: str                     # "one", "two", "three"
    relation: str | None = None   # two-object scenes: object 0 <relation> object 1
    cell: str | None = None       # one-object scenes
    mentions_size: list[bool] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _hash_percent(*parts) -> int:
    return int(hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest(), 16) % 100


def is_held_out(sample: ShapesSample) -> bool:
    """Whether the sample's attribute combination belongs to the held-out set (never in training)."""
    o = sample.objects
    if sample.kind == "one":
        return _hash_percent("one", o[0].color, o[0].shape, sample.cell) < HELD_OUT_PERCENT
    if sample.kind == "two":
        return _hash_percent("two", o[0].color, o[0].shape, sample.relation, o[1].color, o[1].shape) < HELD_OUT_PERCENT
    return False


def cell_center(cell: str) -> tuple[float, float]:
    i = CELLS.index(cell)
    return (i % 3 + 0.5) / 3, (i // 3 + 0.5) / 3


def cell_of(cx: float, cy: float) -> str:
    return CELLS[min(int(cy * 3), 2) * 3 + min(int(cx * 3), 2)]


def _name(obj: ShapeObject, with_size: bool) -> str:
    return f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"


def _one(rng: np.random.Generator) -> ShapesSample:
    cell = CELLS[rng.integers(9)]
    cx, cy = cell_center(cell)
    j = 0.04  # jitter inside the cell
    obj = ShapeObject(PALETTE_NAMES[rng.integers(6)], SHAPES[rng.integers(3)], SIZES[rng.integers(2)],
                      cx + rng.uniform(-j, j), cy + rng.uniform(-j, j))
    with_size = bool(rng.integers(3))  # two thirds of captions name the size
    template = rng.integers(2)
    name = _name(obj, with_size)
    caption = f"a {name} at the {cell}" if template == 0 else f"there is a {name} in the {cell}"
    return ShapesSample(caption, [obj], "one", cell=cell, mentions_size=[with_size])


def _two(rng: np.random.Generator) -> ShapesSample:
    relation = RELATIONS[rng.integers(4)]
    colors = rng.choice(6, size=2, replace=False)
    # Place object 0 and object 1 on a 3x3 grid so that the relation holds with a clear margin.
    horizontal = relation in ("to the left of", "to the right of")
    a, b = sorted(rng.choice(3, size=2, replace=False))  # a < b along the relation axis
    if relation in ("to the right of", "below"):
        a, b = b, a
    other0, other1 = rng.integers(3), rng.integers(3)
    pos0 = (a, other0) if horizontal else (other0, a)
    pos1 = (b, other1) if horizontal else (other1, b)
    objs = []
    for k, (col, row) in enumerate((pos0, pos1)):
        objs.append(ShapeObject(PALETTE_NAMES[colors[k]], SHAPES[rng.integers(3)], SIZES[rng.integers(2)],
                                (col + 0.5) / 3, (row + 0.5) / 3))
    caption = f"a {_name(objs[0], False)} {relation} a {_name(objs[1], False)}"
    return ShapesSample(caption, objs, "two", relation=relation, mentions_size=[False, False])


def _three(rng: np.random.Generator) -> ShapesSample:
    colors = rng.choice(6, size=3, replace=False)
    cells = rng.choice(9, size=3, replace=False)
    objs = [ShapeObject(PALETTE_NAMES[c], SHAPES[rng.integers(3)], "small", *cell_center(CELLS[cell]))
            for c, cell in zip(colors, cells)]
    caption = f"a {_name(objs[0], False)}, a {_name(objs[1], False)} and a {_name(objs[2], False)}"
    return ShapesSample(caption, objs, "three", mentions_size=[False] * 3)


PALETTE_NAMES = tuple(PALETTE)
_MAKERS = {"one": _one, "two": _two, "three": _three}
KIND_WEIGHTS = {"one": 0.5, "two": 0.4, "three": 0.1}


def make_sample(index: int, split: str = "train", seed: int = 0, kind: str | None = None) -> ShapesSample:
    """The deterministic sample ``index`` of a split ("train" or "heldout"); resamples until the sample's
    combination belongs to the split (held-out combinations never appear in "train", and vice versa)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    kinds = list(KIND_WEIGHTS) if split == "train" else ["one", "two"]
    probs = np.array([KIND_WEIGHTS[k] for k in kinds])
    for _ in range(1000):
        k = kind or kinds[rng.choice(len(kinds), p=probs / probs.sum())]
        sample = _MAKERS[k](rng)
        if is_held_out(sample) == (split == "heldout"):
            return sample
    raise RuntimeError("could not draw a sample for this split")  # unreachable with HELD_OUT_PERCENT > 0


MIN_RENDER_SIZE = 8  # below this the smallest objects have no pixels


def render(sample: ShapesSample, size: int = 64, texture: float = 0.0, seed: int = 0) -> Image.Image:
    """Draw the scene (no anti-aliasing: flat palette colours). ``texture`` adds a faint seeded noise (0..1)."""
    if size < MIN_RENDER_SIZE:
        raise ValueError(f"shapes images are drawn at {MIN_RENDER_SIZE} px or more, not {size}")
    bg = np.full((size, size, 3), BACKGROUND, dtype=np.float32)
    if texture > 0:
        noise = np.random.default_rng(seed).normal(0, 6 * texture, (size, size, 1))
        bg = np.clip(bg + noise, 0, 255)
    img = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in sample.objects:
        half = SIZE_FRACTION[o.size] * size / 2
        x, y = o.cx * size, o.cy * size
        box = [round(x - half), round(y - half), round(x + half) - 1, round(y + half) - 1]
        color = PALETTE[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=color)
        elif o.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=color)
    return img


def caption_vocabulary() -> list[str]:
    """Every distinct one-object and two-object caption the generator can write (both splits)."""
    caps = set()
    for c in PALETTE_NAMES:
        for s in SHAPES:
            for cell in CELLS:
                for sz in (None, *SIZES):
                    name = f"{sz} {c} {s}" if sz else f"{c} {s}"
                    caps.add(f"a {name} at the {cell}")
                    caps.add(f"there is a {name} in the {cell}")
    for c1 in PALETTE_NAMES:
        for s1 in SHAPES:
            for rel in RELATIONS:
                for c2 in PALETTE_NAMES:
                    for s2 in SHAPES:
                        if c1 != c2:
                            caps.add(f"a {c1} {s1} {rel} a {c2} {s2}")
    return sorted(caps)
