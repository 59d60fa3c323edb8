#!/usr/bin/env python
"""Train the causal-driven sampler head on top of a frozen STAR backbone.

    python train_sampler.py --config=configs/shapes_sampler.json [--section.key=value ...]
    torchrun --nproc_per_node=8 train_sampler.py --config=... --sampler_train.backbone=outputs/star/final

The backbone (sampler_train.backbone: our checkpoint directory or an official .pth matching model.*), the
VQ-VAE (star_train.vqvae; by default the backbone directory's) and the text encoder stay frozen; settings that
differ from those the backbone directory records stop the run (trainer/sampler_stage.py,
with_backbone_settings). Only the head is optimised, through the same loop
as train.py (DDP with synchronised gradients, AMP, exact resume, TensorBoard). The final directory
(loop.out_dir/final) holds backbone, head, VQ-VAE and text settings: a complete pipeline directory.
"""
import sys

import train
from utils import cli

if __name__ == "__main__":
    sys.exit(cli.run(train.main, sys.argv, "sampler", __doc__))
