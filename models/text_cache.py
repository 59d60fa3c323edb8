"""A caption-embedding cache: the frozen text encoder runs once per distinct (encoder, prompt).

Stored in an LMDB environment; the key is sha1(encoder identity + prompt), the value the safetensors bytes of
{hidden (n, D) over the n valid tokens, pooled (D,)} in float32 (no pickle). Hidden states at padding positions
are zero in every encoder's output (see text_encoder.py), so cached and direct encodings are identical.

The LMDB map (the most it can hold) starts at ``map_size_gb`` and doubles whenever it is full: with SD 2.1's
1024-d CLIP states a caption of n tokens takes (n + 1) x 4 KB (85 KB at 20 tokens), so 64 GB held ~800,000
captions, and a fixed map ended a long training run in ``MapFullError``. Processes sharing the cache (DDP
ranks) adopt a map another one grew.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.text_encoder import TextEncoder
from utils.data.records import growing_transaction


class CachedTextEncoder:
    """Wraps a TextEncoder with an on-disk cache; same ``encode`` contract, ``dim`` and ``max_length``."""

    def __init__(self, encoder: TextEncoder, directory: str | Path, map_size_gb: float = 64, readonly: bool = False):
        self.encoder, self.dim, self.max_length = encoder, encoder.dim, encoder.max_length
        import lmdb  # here: a pipeline or training run without a caption cache needs no lmdb
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(directory), map_size=int(map_size_gb * 2 ** 30), subdir=True, readonly=readonly,
                             lock=not readonly, readahead=False, meminit=False)
        self.hits = self.misses = 0

    def key(self, prompt: str) -> bytes:
        return hashlib.sha1(f"{self.encoder.identity}\0{prompt}".encode()).digest()

    def __len__(self) -> int:
        return self.env.stat()["entries"]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L = len(prompts), self.max_length
        hidden = torch.zeros(B, L, self.dim)
        mask = torch.zeros(B, L, dtype=torch.long)
        pooled = torch.zeros(B, self.dim)
        missing = []
        stored = growing_transaction(self.env, lambda txn: [txn.get(self.key(p)) for p in prompts])
        for i, raw in enumerate(stored):
            if raw is None:
                missing.append(i)
                continue
            item = st_load(raw)
            n = item["hidden"].shape[0]
            hidden[i, :n], mask[i, :n], pooled[i] = item["hidden"], 1, item["pooled"]
        self.hits += B - len(missing)
        self.misses += len(missing)
        if missing:
            h, m, pl = self.encoder.encode([prompts[i] for i in missing])
            h, m, pl = h.cpu(), m.cpu(), pl.cpu()
            values = []
            for j, i in enumerate(missing):
                n = int(m[j].sum())
                if not bool(m[j, :n].all()):
                    raise ValueError("the cache stores right-padded masks only")
                values.append((self.key(prompts[i]),
                               st_save({"hidden": h[j, :n].contiguous(), "pooled": pl[j].contiguous()})))
                hidden[i], mask[i], pooled[i] = h[j], m[j], pl[j]
            growing_transaction(self.env, lambda txn: [txn.put(key, value) for key, value in values], write=True)
        device = self.encoder.device
        return hidden.to(device), mask.to(device), pooled.to(device)

    def close(self) -> None:
        self.env.close()
