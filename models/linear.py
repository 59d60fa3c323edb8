"""``linear`` / ``Linear``: ``F.linear`` / ``nn.Linear``, computed by oneDNN for fp32 inference on a CPU.

For fp32 on a CPU, ``F.linear`` calls a BLAS sgemm that packs the weight matrix anew at every call, which is
slow when few rows go through the weights: during generation the coarse scales of star-d16 run 1-128 rows
(cond + uncond) through every weight. oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the op
PyTorch's own compiler emits for CPU linear layers) on the same plain weights does better there. Measured on the
2-core AVX2 machine, 2 threads, 16 different weights of each star-d16 shape (qkv, proj, fc1, fc2), GFLOP/s,
sgemm -> oneDNN: 8 rows 20-29 -> 38-44; 72 rows 67-101 -> 93-102; 128 rows 81-121 -> 86-117; from 200 rows on
sgemm is as fast or faster (fc2, 512 rows: 149 vs 117), so larger inputs keep ``F.linear``. A whole star-d16
256² generation: scales 0-6 3.15 -> 2.39 s, the transformer 8.98 -> 8.24 s (docs/benchmarks.md). The 128-row
limit was measured on that machine only.

Used only where it cannot change training: CPU tensors, fp32 weights and inputs, autograd off (generation runs
under ``no_grad``), no autocast, not inside ``torch.compile`` (whose CPU backend chooses its own kernels, and
lowers this op only for constant weights); everywhere else, and in a PyTorch built without oneDNN, this is
``F.linear``. Results differ from ``F.linear`` in the last bits (another summation order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAVE_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_MAX_ROWS = 128  # from ~200 rows on, sgemm's packing is amortised and sgemm is as fast or faster


def cpu_fp32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a layer call may use a CPU inference kernel (here and in models.conv): CPU, fp32 input and weight,
    no autograd graph, no autocast, not being traced by ``torch.compile``."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., in) -> (..., out)."""
    if _HAVE_ONEDNN and x.numel() <= _ONEDNN_MAX_ROWS * x.shape[-1] and cpu_fp32_inference(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and initialisation) whose forward is ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
