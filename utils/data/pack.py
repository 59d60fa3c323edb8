"""Packing image-caption pairs into LMDB shards (the library behind ``test_pack.py``).

Sources yield small ``Item`` descriptors (a path or a shapes index, captions) lazily; items are cut into shards
of ``shard_size`` in input order, so shard k always holds the same items and a re-run skips finished shards:
those whose fingerprint (their items and the image options, in .done.json) matches this run's.
Each worker process writes whole shards; images are decoded one at a time (memory stays flat).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import lmdb
from PIL import Image

from utils.cli import InputError
from utils.data.images import to_rgb
from utils.data.records import FORMAT, META_KEY, encode_record, growing_transaction, record_key

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OFFICIAL_CAPTION_KEYS = ("prompt", "google_jp", "llava_zh", "minicpm_caption", "caption", "swintag", "florence_en")


@dataclass
class Item:
    key: str
    captions: dict[str, str]
    path: str | None = None          # an image file
    shapes: tuple | None = None      # (index, split, seed, size, texture) for the built-in data set
    problem: str | None = None       # why the source could not read it (a corrupt caption file): skipped as that


@dataclass
class PackOptions:
    shard_size: int = 10000
    max_side: int = 0                # 0: keep the size; else shrink so that max(w, h) <= max_side (LANCZOS)
    min_side: int = 0                # skip images whose shorter side is smaller
    keep_original: bool = False      # store the original file bytes when no resize is needed
    workers: int = 1
    map_size_gb: float = 64.0        # the LMDB map a shard starts with; doubled whenever it is full


@dataclass
class ShardStats:
    packed: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_items: list = field(default_factory=list)  # [[key, reason], ...]: which inputs, not only how many

    def skip(self, key: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_items.append([key, reason])

    def add(self, packed: int, skipped: dict, skipped_items: list) -> None:
        self.packed += packed
        self.skipped.update(skipped)
        self.skipped_items.extend(skipped_items)


# --- sources ----------------------------------------------------------------------------------------------------
UNREADABLE_CAPTIONS = "unreadable caption file"


def _json_object(text: bytes | str) -> dict | None:
    """A JSON object, or None for anything else (invalid JSON or encoding, a list, a number)."""
    try:
        data = json.loads(text)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return None
    return data if isinstance(data, dict) else None


def _string_fields(data: dict, keys: tuple[str, ...]) -> dict[str, str]:
    return {k: data[k].strip() for k in keys if isinstance(data.get(k), str)}


def _sidecar_item(root: Path, image: Path, caption_keys: tuple[str, ...]) -> Item:
    key, txt, js = str(image.relative_to(root)), image.with_suffix(".txt"), image.with_suffix(".json")
    if txt.is_file():
        return Item(key, {"caption": txt.read_text(errors="replace").strip()}, path=str(image))
    if js.is_file():
        data = _json_object(js.read_bytes())
        if data is None:
            return Item(key, {}, path=str(image), problem=UNREADABLE_CAPTIONS)
        return Item(key, _string_fields(data, caption_keys), path=str(image))
    return Item(key, {}, path=str(image))


def folder_items(root: str | Path, caption_keys: tuple[str, ...] = ("caption", "prompt")) -> Iterator[Item]:
    """Images in a folder tree with captions in sidecar ``.txt`` or ``.json`` files (same stem)."""
    root = Path(root)
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        yield _sidecar_item(root, path, caption_keys)


def manifest_items(manifest: str | Path, caption_keys: tuple[str, ...] = ("caption",)) -> Iterator[Item]:
    """JSONL or CSV rows with an ``image`` column (relative to the manifest) and caption columns."""
    manifest = Path(manifest)
    base = manifest.parent
    with open(manifest, newline="", errors="replace") as f:
        rows = (_json_object(line) for line in f if line.strip()) if manifest.suffix == ".jsonl" \
            else csv.DictReader(f)
        for i, row in enumerate(rows):
            if row is None:  # a malformed JSONL line: one input lost, not the run
                yield Item(f"{manifest.stem}-{i}", {}, problem="unreadable manifest row")
                continue
            image = str(row.get("image", ""))
            captions = {k: str(row[k]).strip() for k in caption_keys if row.get(k)}
            path = Path(image) if Path(image).is_absolute() else base / image
            yield Item(f"{manifest.stem}-{i}", captions, path=str(path))


def official_items(data_dir: str | Path, image_dir: str = "images", json_dir: str = "jsons",
                   caption_keys: tuple[str, ...] = OFFICIAL_CAPTION_KEYS) -> Iterator[Item]:
    """The official layout: ``<data_dir>/<json_dir>/*.json`` (id, basename, prompt/caption fields) with images in
    ``<data_dir>/<image_dir>/`` named by ``basename`` (or the JSON's stem with any image extension)."""
    data_dir = Path(data_dir)
    for js in sorted((data_dir / json_dir).glob("*.json")):
        info = _json_object(js.read_bytes())
        if info is None:
            yield Item(js.stem, {}, problem=UNREADABLE_CAPTIONS)
            continue
        basename = info.get("basename")
        candidates = [data_dir / image_dir / basename] if isinstance(basename, str) and basename else []
        candidates += [data_dir / image_dir / (js.stem + ext) for ext in IMAGE_EXTS]
        path = next((c for c in candidates if c.is_file()), None)
        yield Item(str(info.get("id", js.stem)), _string_fields(info, caption_keys), path=str(path) if path else None)


def shapes_items(count: int, split: str = "train", seed: int = 0, size: int = 64, texture: float = 0.0):
    """The built-in shapes data set, rendered at pack time."""
    from utils.data.shapes import make_sample
    for i in range(count):
        yield Item(f"shapes-{split}-{seed}-{i}", {"caption": make_sample(i, split, seed).caption},
                   shapes=(i, split, seed, size, texture))


# --- packing ----------------------------------------------------------------------------------------------------
def _load_image(item: Item, opts: PackOptions) -> tuple[bytes, int, int, str]:
    """(stored bytes, width, height, format); raises on unreadable images."""
    if item.shapes is not None:
        from utils.data.shapes import make_sample, render
        index, split, seed, size, texture = item.shapes
        img = render(make_sample(index, split, seed), size, texture, seed=index)
        original = None
    else:
        if item.path is None or not os.path.isfile(item.path):
            raise FileNotFoundError(item.path)
        with open(item.path, "rb") as f:
            original = f.read()
        img = Image.open(io.BytesIO(original))
        img.load()
        fmt = (img.format or "png").lower()
    img = to_rgb(img)  # upright, 8-bit, alpha on white: also what the reader does with kept originals
    w, h = img.size
    if opts.min_side and min(w, h) < opts.min_side:
        raise _TooSmall(f"{w}x{h}")
    if opts.max_side and max(w, h) > opts.max_side:
        scale = opts.max_side / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
        original = None
    if original is not None and opts.keep_original:
        return original, img.width, img.height, fmt
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), img.width, img.height, "png"


class _TooSmall(Exception):
    pass


PENDING_BYTES = 256 * 2 ** 20  # records held for one transaction: at most 1000 or this many bytes


def write_shard(out_dir: Path, shard_id: int, items: list[Item], opts: PackOptions) -> ShardStats:
    """Write one shard (atomically marked complete by its .done.json)."""
    name = f"shard-{shard_id:05d}"
    path = out_dir / name
    stats = ShardStats()
    sizes = []
    if path.exists():  # an unfinished earlier attempt: start the shard over
        for f in path.iterdir():
            f.unlink()
    env = lmdb.open(str(path), map_size=int(opts.map_size_gb * 2 ** 30), subdir=True, meminit=False)
    pending: list[tuple[bytes, bytes]] = []  # records since the last commit: written again if the map grows
    pending_bytes = 0

    def commit() -> None:
        nonlocal pending_bytes
        growing_transaction(env, lambda txn: [txn.put(key, value) for key, value in pending], write=True)
        pending.clear()
        pending_bytes = 0

    try:
        for item in items:
            if item.problem:
                stats.skip(item.key, item.problem)
                continue
            captions = {k: v for k, v in item.captions.items() if v}
            if not captions:
                stats.skip(item.key, "missing caption")
                continue
            try:
                data, w, h, fmt = _load_image(item, opts)
            except _TooSmall:
                stats.skip(item.key, "too small")
                continue
            except FileNotFoundError:
                stats.skip(item.key, "missing image")
                continue
            except Exception:  # PIL raises many types for corrupt files
                stats.skip(item.key, "unreadable image")
                continue
            header = {"key": item.key, "captions": captions, "width": w, "height": h, "format": fmt}
            pending.append((record_key(stats.packed), encode_record(header, data)))
            pending_bytes += len(pending[-1][1])
            sizes.append([w, h])
            stats.packed += 1
            if len(pending) == 1000 or pending_bytes > PENDING_BYTES:  # keep transactions small
                commit()
        pending.append((META_KEY, json.dumps({"format": FORMAT, "count": stats.packed}).encode()))
        commit()
        env.sync()
    finally:
        env.close()
    (out_dir / f"{name}.index.json").write_text(json.dumps(sizes))
    done = {"packed": stats.packed, "skipped": dict(stats.skipped), "skipped_items": stats.skipped_items,
            "inputs": len(items),
            "fingerprint": shard_fingerprint(items, opts)}
    tmp = out_dir / f".{name}.done.json.tmp"
    tmp.write_text(json.dumps(done))
    os.replace(tmp, out_dir / f"{name}.done.json")
    return stats


def shard_fingerprint(items: list[Item], opts: PackOptions) -> dict:
    """What a shard's content depends on: its items (keys, captions, shapes parameters) and the options that
    change the stored images. Recorded in .done.json so that a re-run reuses a shard only if it would write the
    same one."""
    digest = hashlib.sha1()
    for item in items:
        digest.update(json.dumps([item.key, item.captions, item.shapes], sort_keys=True).encode())
        digest.update(b"\n")
    return {"items_sha1": digest.hexdigest(), "max_side": opts.max_side, "min_side": opts.min_side,
            "keep_original": opts.keep_original}


def _check_reusable(done: Path, info: dict, items: list[Item], opts: PackOptions) -> None:
    """InputError unless the finished shard is what this run would write (files written before fingerprints
    were recorded are taken as they are)."""
    recorded, wanted = info.get("fingerprint"), shard_fingerprint(items, opts)
    if recorded is None or recorded == wanted:
        return
    changed = [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in wanted.items() if k != "items_sha1" and
               recorded.get(k) != v]
    if recorded.get("items_sha1") != wanted["items_sha1"]:
        changed.append("its items (images added or removed before it, other captions, --shard-size or the "
                       "shapes settings)")
    raise InputError(f"{done.parent} holds {done.name[:-len('.done.json')]} from another packing run "
                     f"({'; '.join(changed)}): pack into a new --out, or delete that folder to start over")


def _shard_job(args):
    out_dir, shard_id, items, opts = args
    return shard_id, write_shard(out_dir, shard_id, items, opts)


def pack(items: Iterator[Item], out_dir: str | Path, opts: PackOptions, progress=None) -> dict:
    """Pack all items; returns a summary {packed, skipped: {reason: n}, skipped_items: [[key, reason]],
    shards_written, shards_reused, inputs_written (the inputs of the shards written now)}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total, reused, inputs_written = ShardStats(), 0, 0

    def jobs():
        nonlocal reused
        it, shard_id = iter(items), 0
        while chunk := list(islice(it, opts.shard_size)):
            done = out_dir / f"shard-{shard_id:05d}.done.json"
            if done.is_file():  # resumable: finished shards are kept
                info = json.loads(done.read_text())
                _check_reusable(done, info, chunk, opts)
                total.add(info["packed"], info["skipped"], info.get("skipped_items", []))
                reused += 1
                if progress:
                    progress(len(chunk))
            else:
                yield out_dir, shard_id, chunk, opts
            shard_id += 1

    def account(stats: ShardStats, n_inputs: int):
        nonlocal inputs_written
        inputs_written += n_inputs
        total.add(stats.packed, stats.skipped, stats.skipped_items)
        if progress:
            progress(n_inputs)

    shards = 0
    if opts.workers <= 1:
        for job in jobs():
            account(_shard_job(job)[1], len(job[2]))
            shards += 1
    else:
        with get_context("spawn").Pool(opts.workers) as pool:
            pending = jobs()
            sizes = {}

            def tracked():
                for job in pending:
                    sizes[job[1]] = len(job[2])
                    yield job

            for shard_id, stats in pool.imap_unordered(_shard_job, tracked()):
                account(stats, sizes.pop(shard_id))
                shards += 1
    return {"packed": total.packed, "skipped": dict(total.skipped), "skipped_items": total.skipped_items,
            "shards_written": shards, "shards_reused": reused, "inputs_written": inputs_written}
