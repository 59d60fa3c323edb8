"""Training checkpoints: everything needed for an exact resume, written atomically, newest-valid auto-resume.

One file per checkpoint, ``<out_dir>/ckpt-<step>.pt``: model, EMA, optimizer, grad scaler, step, data position,
RNG states of every rank and the resolved config. Written by rank 0 only, via a temporary file and a rename,
so a run killed at any moment leaves the previous checkpoints intact. Loaded with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from models.checkpoint import CheckpointError, atomic_save, read_weights

log = logging.getLogger("star")
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_TRAINING_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "batches_in_epoch", "rng")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoint files, newest first."""
    out = []
    for p in Path(out_dir).glob("ckpt-*.pt"):
        m = _NAME.match(p.name)
        if m:
            out.append((int(m[1]), p))
    return sorted(out, reverse=True)


def save_checkpoint(out_dir: str | Path, step: int, payload: dict, keep_last: int) -> Path:
    path = checkpoint_path(out_dir, step)
    atomic_save(lambda tmp: torch.save(payload, tmp), path)
    for _, old in list_checkpoints(out_dir)[keep_last:]:
        old.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a killed process left behind (each as large as a
    checkpoint: on a run preempted many times they would fill the disk). Only while nothing is being written."""
    stale = sorted(Path(out_dir).glob(".ckpt-*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint; CheckpointError when the file is missing, unreadable or holds something else
    (exported weights, an official file)."""
    ckpt = read_weights(path)
    missing = [key for key in _TRAINING_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (a run's <loop.out_dir>/ckpt-*.pt; it lacks "
                              f"{', '.join(missing)}): to start from its weights, use --loop.init_from")
    return ckpt


def find_resumable(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; corrupt or truncated ones are skipped with a warning."""
    for _, path in list_checkpoints(out_dir):
        try:
            return path, load_checkpoint(path)
        except Exception as e:
            log.warning("skipping unreadable checkpoint %s (%s: %s)", path, type(e).__name__, e)
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
