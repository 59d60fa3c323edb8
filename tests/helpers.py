"""Shared test helpers (not collected as tests)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StandInInception:
    """A fixed random projection of pooled pixels: the FID code path without the real Inception weights."""
    def __init__(self):
        self.proj = torch.randn(3 * 8 * 8, 12, generator=torch.Generator().manual_seed(5))

    def __call__(self, images):
        return (F.adaptive_avg_pool2d(images, 8).flatten(1) @ self.proj).double().numpy()


def run_check_parity(reference_dir: Path, part: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_parity.py"),
                           "--reference-dir", str(reference_dir), "--part", part],
                          capture_output=True, text=True, timeout=600)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"check_parity printed no JSON:\n{proc.stdout}\n{proc.stderr}") from None


def read_manifest(path: Path) -> list[tuple[str, list[int]]]:
    """[(key, shape)] in file order from a reference manifest (comment lines skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        rows.append((key, json.loads(shape)))
    return rows


def manifest_param_count(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("# parameter count:"):
            return int(line.split(":")[1].split()[0])
    raise ValueError(f"no parameter count in {path}")


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's values on the host (a host-device sync on a GPU): ``.item()``,
    ``nonzero`` and indexing with a boolean mask. A ``.tolist()`` is one transfer and not an op, so not recorded."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        masks = args[1] if name.startswith("aten.index.Tensor") else ()
        if "_local_scalar_dense" in name or "nonzero" in name or any(
                m is not None and m.dtype == torch.bool for m in masks):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))
