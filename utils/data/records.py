"""LMDB shards of image-caption records: our format, and a reader for the official packs.

Our format (one directory per shard, written by ``test_pack.py``):
    <out>/shard-00000/            an LMDB environment (data.mdb, lock.mdb)
        key b"00000000", b"00000001", ...   value = record (below)
        key b"__meta__"                      JSON {"format": "star-lmdb-v1", "count": N}
    <out>/shard-00000.index.json  [[width, height], ...] per record (filters without opening images)
    <out>/shard-00000.done.json   written last: the shard is complete (re-runs skip it) + its statistics
Record = 4-byte little-endian header length | UTF-8 JSON header | image bytes, where the header is
    {"key": source id, "captions": {field: text, ...}, "width": w, "height": h, "format": "png" | "jpeg" | ...}.
Nothing is pickled.

Official packs (STAR's lmdbdict): an LMDB file ``<name>`` (+ ``<name>-lock``) whose keys and values are pickled
str / PNG bytes, a pickled ``__keys__`` list, and ``<name>-info.json`` {key: source JSON with captions, height,
width}. They are read with an unpickler that refuses every global (plain str/bytes/list only).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: training on the built-in shapes data needs no lmdb
    import lmdb

FORMAT = "star-lmdb-v1"
META_KEY = b"__meta__"


def encode_record(header: dict, image_bytes: bytes) -> bytes:
    h = json.dumps(header, ensure_ascii=False).encode()
    return struct.pack("<I", len(h)) + h + image_bytes


def decode_record(value: bytes) -> tuple[dict, bytes]:
    if len(value) < 4:
        raise ValueError("record too short")
    (n,) = struct.unpack("<I", value[:4])
    if 4 + n > len(value):
        raise ValueError("record header length exceeds the record")
    return json.loads(value[4:4 + n].decode()), value[4 + n:]


def record_key(i: int) -> bytes:
    return b"%08d" % i


def open_readonly(path: str | Path, subdir: bool = True) -> lmdb.Environment:
    """Read-only, lock-free, no readahead: many processes and DataLoader workers read concurrently."""
    import lmdb
    return lmdb.open(str(path), subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False,
                     max_readers=512)


def growing_transaction(env: lmdb.Environment, body, write: bool = False):
    """``body(txn)`` in a transaction of ``env``, retried after doubling a full map (``MapFullError``) or adopting a
    map that another process grew (``MapResizedError``). A failed transaction is aborted whole, so ``body`` must
    do all its work again when called anew. Writers (packing, the caption cache) need no map size up front."""
    import lmdb
    while True:
        try:
            with env.begin(write=write) as txn:
                return body(txn)
        except lmdb.MapResizedError:
            env.set_mapsize(0)
        except lmdb.MapFullError:
            env.set_mapsize(2 * env.info()["map_size"])


# LMDB lets a process open an environment once: a second open of the same path fails ("already open in this
# process"), which made every record of a second data set over the same shards (validation data that is the
# training data, a notebook building a data set twice) look unreadable. Shards share one per path and process.
# Each open environment holds a file descriptor: with more shards than the process may open files (ulimit -n,
# often 1024; 10M images in shards of 10k are 1000 shards), every read past the limit failed and those records
# were skipped as unreadable. So at most ``max_open_envs()`` stay open, the least recently used closed first
# (reopening one costs ~0.1 ms, a JPEG decode ~5 ms).
_SHARED_ENVS: dict[int, OrderedDict[str, lmdb.Environment]] = {}  # pid -> path -> env, least recently used first


def max_open_envs() -> int:
    """A quarter of the files this process may open (the rest for sockets, checkpoints, logs), at least 8."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):  # no ``resource`` module (Windows)
        return 256
    return 4096 if soft == resource.RLIM_INFINITY else max(8, soft // 4)


def shared_readonly(path: str | Path, subdir: bool = True) -> lmdb.Environment:
    """``open_readonly(path)``, opened once per process and shared by every reader of that path while open. Only
    this process's environments are counted and closed (a forked worker leaves its parent's alone)."""
    envs = _SHARED_ENVS.setdefault(os.getpid(), OrderedDict())
    key = str(Path(path).resolve())
    if key in envs:
        envs.move_to_end(key)
        return envs[key]
    limit = max_open_envs()
    while envs and len(envs) >= limit:
        envs.popitem(last=False)[1].close()
    envs[key] = open_readonly(path, subdir)
    return envs[key]


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # official packs hold str / bytes / list only
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an official LMDB pack")


def safe_unpickle(data: bytes):
    return _PlainUnpickler(io.BytesIO(data)).load()


class Shard:
    """One shard of either format: ``len()``, ``sizes`` (n, 2) int32 [w, h], ``read(i) -> (header, image bytes)``.
    The LMDB environment opens lazily (after DataLoader workers fork) and reopens in a new process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (self.path.parent / f"{self.path.name}.index.json").is_file():  # ours
            self.official = False
            sizes = json.loads((self.path.parent / f"{self.path.name}.index.json").read_text())
        else:
            info_path = self.path.parent / f"{self.path.name}-info.json"
            if not info_path.is_file():
                raise FileNotFoundError(f"{self.path}: neither a star shard (.index.json) nor an official pack "
                                        f"(-info.json)")
            self.official = True
            self.info = json.loads(info_path.read_text())
            self.keys = list(self.info)
            sizes = [(int(v.get("width") or 0), int(v.get("height") or 0)) for v in self.info.values()]
        self.sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)  # (n, 2) width, height; 0 = unknown

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def env(self) -> lmdb.Environment:
        return shared_readonly(self.path, subdir=not self.official)  # per process: opened after workers fork

    def read(self, i: int) -> tuple[dict, bytes]:
        with self.env.begin(buffers=False) as txn:
            if not self.official:
                value = txn.get(record_key(i))
                if value is None:
                    raise KeyError(f"{self.path}: record {i} missing")
                return decode_record(value)
            key = self.keys[i]
            value = None
            for protocol in (4, 3):
                value = txn.get(pickle.dumps(key, protocol=protocol))
                if value is not None:
                    break
            if value is None:
                raise KeyError(f"{self.path}: key {key!r} missing")
            info = self.info[key]
            captions = {k: v for k, v in info.items() if isinstance(v, str) and k not in ("id", "basename")}
            return {"key": key, "captions": captions, "width": info.get("width"), "height": info.get("height"),
                    "format": "png"}, safe_unpickle(value)


def find_shards(root: str | Path) -> list[Path]:
    """All complete shards under ``root`` (ours: with a .done.json; official: with -info.json and -lock)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LMDB directory not found: {root}")
    ours = sorted(p.parent / p.name[: -len(".done.json")] for p in root.glob("*.done.json"))
    official = sorted(p.parent / p.name[: -len("-info.json")] for p in root.glob("*-info.json")
                      if (p.parent / p.name[: -len("-info.json")]).is_file())
    return ours + official
