"""``Conv2d``: ``nn.Conv2d`` whose wide 3x3 convolutions run as Winograd convolutions (NNPACK) for fp32 inference
on a CPU.

oneDNN computes a 3x3 convolution directly (9 multiply-adds per weight and output pixel); NNPACK's Winograd
algorithm (PyTorch's ``torch._nnpack_spatial_convolution``, built into the x86 CPU wheels) needs about a quarter
of the multiplications, at the price of transforming tiles of the input and output. Measured on the 2-core AVX2
machine, 2 threads, one image, ms per convolution, oneDNN (best of NCHW and channels-last) -> NNPACK:
160 -> 160 channels at 256^2: 173 -> 78; at 128^2: 49 -> 21; 320 -> 320 at 64^2: 50 -> 25; 128 -> 128 at 64^2:
7.5 -> 5.9; but 640 -> 640 at 16^2: 13 -> 52, 32 -> 32 at 64^2: 0.95 -> 1.10, 16 -> 16 at 128^2: 0.53 -> 1.22. Hence
the thresholds below (>= 128 channels in and out, >= 64^2 pixels). For batches NNPACK switches to an algorithm
that was slower than oneDNN here (batch 4: 0.8-0.9x), so a batch runs image by image, which also makes every
image's result independent of the batch it is in. A whole star-d16 256^2 VQ-VAE decode, the two paths alternated
in one process (medians of 4): 3.5 -> 2.2 s at batch 1, 13.7 -> 9.1 s at batch 4 (docs/benchmarks.md).

NNPACK runs on its own thread pool: here it used both cores even under ``torch.set_num_threads(1)``.

Winograd's transforms round differently from direct convolution: outputs differ by ~2e-5 relative (a whole
256^2 decode with random weights: at most 4.6e-5 in [-1, 1], 0.04% of 8-bit pixels off by one). cuDNN picks
Winograd kernels on GPUs in the same way.

Used only where it cannot change training: CPU tensors, fp32 weights and inputs, autograd off, no autocast, not
inside ``torch.compile``, 3x3 kernels with stride 1, padding 1, no dilation or groups. Everywhere else, and in a
PyTorch built without NNPACK, this is ``nn.Conv2d``.
"""
from __future__ import annotations

import torch
from torch import nn

from models.linear import cpu_fp32_inference

# ``is_available`` also initialises NNPACK, which ``_nnpack_spatial_convolution`` needs and does not do itself.
_HAVE_NNPACK = torch.backends.nnpack.is_available()
_MIN_CHANNELS = 128       # narrower convolutions: oneDNN is as fast or faster
_MIN_PIXELS = 64 * 64     # smaller maps: the tile transforms cost more than they save (640 ch at 16^2: 4x slower)


def _winograd_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (_HAVE_NNPACK and x.dim() == 4
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) >= _MIN_CHANNELS
            and x.shape[-1] * x.shape[-2] >= _MIN_PIXELS
            and cpu_fp32_inference(x, conv.weight))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state dict and initialisation); see the module docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _winograd_applies(self, x):
            return super().forward(x)
        x = x.contiguous()  # NNPACK reads NCHW
        images = [torch._nnpack_spatial_convolution(x[i:i + 1], self.weight, self.bias, [1, 1])
                  for i in range(x.shape[0])]
        return images[0] if len(images) == 1 else torch.cat(images)
