"""What the CPU can do fast, for choosing (or warning about) a precision."""
from __future__ import annotations

from pathlib import Path


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX bf16 matrix units (Linux: /proc/cpuinfo flags). Without them PyTorch's CPU bf16 /
    fp16 matmuls run ~100x slower than fp32 (AVX2 machines: ~0.6 GFLOP/s)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
