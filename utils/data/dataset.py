"""Datasets (LMDB shards or the streamed shapes set) and a resumable distributed sampler.

Every random choice of an item (crop, flip, caption field, caption dropout) comes from a generator seeded by
(seed, epoch, index), so a run resumed mid-epoch sees exactly the same data as an uninterrupted one, with any
number of DataLoader workers. Items: {"image": (3, R, R) float in [-1, 1], "caption": str, "key": str (the
source's id of the record, not necessarily unique across folders), "record": int (the record's number in this
data set, unique: the token cache's key)}, and from LMDB also "skipped": 1 if the index's own record was
unreadable and the next readable one served instead, else 0 (the training loop logs the running total as
``skipped_records``).
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from utils.config import ConfigError
from utils.data.images import to_rgb
from utils.data.records import Shard, find_shards

log = logging.getLogger("star")


@dataclass
class ImageTransform:
    resolution: int
    random_crop: float = 0.0   # > 0: crop a random square of side in [1 - random_crop, 1] x short side
    hflip: bool = False

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        img = to_rgb(img)
        w, h = img.size
        side = min(w, h)
        if self.random_crop > 0:
            side = max(1, round(side * rng.uniform(1 - self.random_crop, 1)))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        else:  # centre crop to the short side
            left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if img.size != (self.resolution, self.resolution):
            img = img.resize((self.resolution, self.resolution), Image.LANCZOS)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(127.5).sub_(1)
        if self.hflip and rng.random() < 0.5:
            arr = arr.flip(-1)
        return arr


class _CaptionedDataset(Dataset):
    """Shared caption selection and per-item seeding."""

    def __init__(self, caption_keys: tuple[str, ...] | None, caption_dropout: float, seed: int):
        self.caption_keys, self.caption_dropout, self.seed = caption_keys, caption_dropout, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def choose_caption(self, captions: dict[str, str], rng: np.random.Generator) -> str:
        keys = self.caption_keys
        options = [v for k, v in sorted(captions.items()) if v and (keys is None or k in keys)]
        caption = options[rng.integers(len(options))] if options else ""
        if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
            caption = ""  # the unconditional prompt for classifier-free guidance
        return caption.strip()


class LMDBImageTextDataset(_CaptionedDataset):
    """Image-caption records from LMDB shard folders (ours or official packs), filtered by size/aspect.

    A corrupt or undecodable record is skipped (the next valid index is returned instead), counted in
    ``self.skipped`` and logged; it never stops training.
    """

    def __init__(self, roots: list[str | Path], transform: ImageTransform, caption_keys: tuple[str, ...] | None = None,
                 caption_dropout: float = 0.0, min_side: int = 0, max_aspect: float = 0.0, seed: int = 0):
        super().__init__(caption_keys, caption_dropout, seed)
        self.transform = transform
        self.shards = [Shard(p) for root in roots for p in find_shards(root)]
        if not self.shards:
            raise FileNotFoundError(f"no complete LMDB shards under {roots}: pack data with test_pack.py first")
        # (N, 2) int64 arrays, not lists of tuples: 20M records were ~4 GB of Python objects per process, and
        # DataLoader workers copy such objects' pages as they touch their reference counts.
        kept, upscaled = [], 0
        for si, shard in enumerate(self.shards):
            w, h = shard.sizes[:, 0].astype(np.float64), shard.sizes[:, 1].astype(np.float64)
            known, short = (w > 0) & (h > 0), np.minimum(w, h)
            drop = known & (short < min_side)
            if max_aspect:
                drop |= known & (np.maximum(w, h) > max_aspect * short)
            rows = np.flatnonzero(~drop)
            kept.append(np.stack((np.full_like(rows, si), rows), axis=1))
            # Smaller than the training resolution: upscaled, worth a warning (train.py), as blurry inputs teach
            # blur (a folder packed with a small test_pack.py --max-side, say).
            upscaled += int((known & (short < transform.resolution))[rows].sum())
        self.index = np.concatenate(kept).astype(np.int64)
        if not len(self.index):
            raise ConfigError("every record was filtered out: data.min_side / data.max_aspect too strict?")
        self.upscaled = upscaled
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> tuple[Image.Image, dict]:
        si, ri = self.index[i].tolist()
        header, data = self.shards[si].read(ri)
        img = Image.open(io.BytesIO(data))
        img.load()
        return img, header

    def __getitem__(self, i: int) -> dict:
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            try:
                img, header = self.load(j)
            except Exception as e:  # corrupt record: skip and count, never crash a long run
                self.skipped += 1
                log.warning("skipping unreadable record %d (%s: %s); %d skipped so far in this process",
                            j, type(e).__name__, e, self.skipped)
                continue
            rng = self.rng(i)
            return {"image": self.transform(img, rng), "caption": self.choose_caption(header["captions"], rng),
                    "key": str(header.get("key", j)), "record": j, "skipped": int(attempt > 0)}
        raise RuntimeError("no readable record in the data set")


class ShapesDataset(_CaptionedDataset):
    """The built-in shapes set rendered on the fly (no packing needed)."""

    def __init__(self, count: int, transform: ImageTransform, split: str = "train", data_seed: int = 0,
                 texture: float = 0.0, caption_dropout: float = 0.0, seed: int = 0):
        super().__init__(None, caption_dropout, seed)
        self.count, self.transform, self.split = count, transform, split
        self.data_seed, self.texture = data_seed, texture

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        from utils.data.shapes import make_sample, render
        sample = make_sample(i, self.split, self.data_seed)
        rng = self.rng(i)
        img = render(sample, self.transform.resolution, self.texture, seed=i)
        return {"image": self.transform(img, rng), "caption": self.choose_caption({"caption": sample.caption}, rng),
                "key": f"shapes-{self.split}-{i}", "record": i}


class DistributedResumableSampler(Sampler[int]):
    """Epoch-seeded permutation shared by all ranks, padded to a multiple of the world size, rank r taking
    positions r, r + world, ...; ``start`` skips the first indices of this rank (mid-epoch resume)."""

    def __init__(self, size: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0):
        self.size, self.rank, self.world, self.shuffle, self.seed = size, rank, world, shuffle, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        # A tensor until this rank's share is taken: a Python list of every index was ~36 bytes per record.
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        total = math.ceil(self.size / self.world) * self.world
        # Pad by wrapping (repeatedly when there are more ranks than items) so every rank gets the same count:
        # unequal counts leave the ranks with more batches waiting in a collective for the others.
        order = order.repeat(math.ceil(total / self.size))[:total]
        return order[self.rank::self.world].tolist()

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world) - self.start
