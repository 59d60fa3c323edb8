"""Every trainable parameter of every stage's model gets a gradient from one loss: DDP (without the slow
find_unused_parameters) fails at the second step otherwise."""
import pytest
import torch
from torch.utils.data import DataLoader

from tests.train_helpers import make_vqvae_dir, star_overrides, vqvae_overrides
from train import build_dataset
from trainer.config import RunConfig
from utils.config import load_config


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    vqvae = make_vqvae_dir(root / "vqvae")
    from trainer.star_stage import StarStage
    cfg = load_config(RunConfig, None, _star_args(vqvae))
    StarStage(cfg, torch.device("cpu")).export(root / "star", None)  # a backbone for the sampler stage
    return {"vqvae": vqvae, "star": root / "star"}


def _star_args(vqvae_dir):
    return [a for a in star_overrides(vqvae_dir.parent / "unused", vqvae_dir) if not a.startswith("--loop.out_dir")]


def _unused_parameters(args: list[str]) -> list[str]:
    cfg = load_config(RunConfig, None, args)
    torch.manual_seed(0)
    if cfg.stage == "vqvae":
        from trainer.vqvae_stage import VQVAEStage as Stage
    elif cfg.stage == "sampler":
        from trainer.sampler_stage import SamplerStage as Stage
    else:
        from trainer.star_stage import StarStage as Stage
    stage = Stage(cfg, torch.device("cpu"))
    batch = next(iter(DataLoader(build_dataset(cfg, cfg.resolution), batch_size=4)))
    stage.model.train()
    stage.loss(stage.model, batch)[0].backward()
    return [n for n, p in stage.model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("extra", [[], ["--model.rope=false"], ["--model.cross_attn=false"],
                                   ["--star_train.token_drop=window", "--star_train.drop_from_scale=-1"]])
def test_star_stage(dirs, extra):
    assert _unused_parameters(_star_args(dirs["vqvae"]) + extra) == []


@pytest.mark.parametrize("sample_from", [-1, 1])
def test_sampler_stage(dirs, sample_from):
    args = [a.replace("--stage=star", "--stage=sampler") for a in _star_args(dirs["vqvae"])]
    assert _unused_parameters(args + [f"--sampler_train.backbone={dirs['star']}",
                                      f"--sampler_train.sample_from={sample_from}"]) == []


@pytest.mark.parametrize("patch_nums", ["[1,2,4]", "[1,2,3,4]", "[1,2,3,4,5,6,7,8]"])  # 3, 4 and 8 scales, 4 phis
def test_vqvae_stage(patch_nums):
    assert _unused_parameters(vqvae_overrides(**{"vqvae.patch_nums": patch_nums})) == []
