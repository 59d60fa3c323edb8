"""Every shipped config loads, validates (with the user-supplied paths filled in) and builds its models."""
import json

import pytest
import torch

from models.star import STAR
from models.vqvae import VQVAE
from tests.helpers import REPO, read_manifest
from trainer.config import RunConfig
from trainer.star_stage import load_init_weights
from utils.config import ConfigError, load_config

CONFIGS = sorted((REPO / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_builds(path):
    data = json.loads(path.read_text())
    overrides = []
    if data.get("data", {}).get("source") == "lmdb" and not data["data"]["lmdb_dirs"]:
        with pytest.raises(ConfigError, match="needs data.lmdb_dirs"):  # user-supplied, never in the file
            load_config(RunConfig, path)
        overrides.append("--data.lmdb_dirs=[\"data/train\"]")
    if data.get("stage") == "star" and not data["star_train"]["vqvae"]:
        with pytest.raises(ConfigError, match="needs star_train.vqvae"):
            load_config(RunConfig, path, overrides)
        overrides.append("--star_train.vqvae=checkpoints/vqvae")
    if data.get("vqvae_train", {}).get("perceptual_weight", 0) > 0:
        with pytest.raises(ConfigError, match="needs two local weight files: --vqvae_train.perceptual_vgg="):
            load_config(RunConfig, path, overrides)
        overrides += ["--vqvae_train.perceptual_vgg=weights/vgg16.pth", "--vqvae_train.perceptual_lin=weights/vgg.pth"]
    cfg = load_config(RunConfig, path, overrides)
    assert '"/' not in path.read_text()  # no absolute paths in shipped configs
    with torch.device("meta"):
        if cfg.stage == "star":
            STAR(cfg.model)
        else:
            VQVAE(cfg.vqvae)


def test_tokenizer_recipe_trains_the_released_vqvae_layout(reference_dir):
    """configs/vqvae_f16_256.json trains a tokenizer with the key layout of VAR's vae_ch160v4096z32.pth (so the
    paper's STAR configs and official STAR weights can use it) and its 10-scale 256^2 schedule."""
    cfg = load_config(RunConfig, REPO / "configs" / "vqvae_f16_256.json",
                      ["--data.lmdb_dirs=d", "--vqvae_train.perceptual_vgg=a", "--vqvae_train.perceptual_lin=b"])
    with torch.device("meta"):
        vae = VQVAE(cfg.vqvae)
    ours = [(k, list(v.shape)) for k, v in vae.state_dict().items()]
    assert ours == read_manifest(reference_dir / "manifest_vae_ch160v4096z32.txt")
    star = load_config(RunConfig, REPO / "configs" / "star_d16_256.json",
                       ["--star_train.vqvae=x", "--data.lmdb_dirs=d"])
    assert cfg.vqvae == star.vqvae and cfg.resolution == 256


def test_paper_d16_config_is_the_official_recipe():
    cfg = load_config(RunConfig, REPO / "configs" / "star_d16_256.json", ["--star_train.vqvae=x", "--data.lmdb_dirs=d"])
    assert cfg.model.depth == 16 and cfg.model.width == 1024 and len(cfg.model.patch_nums) == 10
    assert (cfg.loop.batch_size, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (512, 1e-4, 0.05, 2.0)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.schedule == "lin0"


def test_progressive_resolution_grows_level_embedding(tmp_path):
    """Start a longer schedule from a shorter-schedule checkpoint: new lvl_embed rows, everything else loaded."""
    from models.checkpoint import save_pretrained
    from models.star import StarConfig
    small_cfg = StarConfig(depth=2, width=64, num_heads=2, vocab_size=32, z_channels=8, text_dim=32,
                           patch_nums=(1, 2, 4))
    small = STAR(small_cfg)
    small.init_weights()
    save_pretrained(tmp_path / "small", star=small)
    big = STAR(StarConfig(**{**small_cfg.__dict__, "patch_nums": (1, 2, 3, 4, 6)}))
    big.init_weights()
    load_init_weights(big, str(tmp_path / "small"))
    assert torch.equal(big.lvl_embed.weight[:3], small.lvl_embed.weight)
    assert big.lvl_embed.weight.shape[0] == 5 and big.lvl_embed.weight[3:].abs().sum() > 0
    assert torch.equal(big.blocks[1].ffn.fc1.weight, small.blocks[1].ffn.fc1.weight)


def test_starting_from_a_run_with_another_text_encoder_or_vqvae_warns(tmp_path):
    """loop.init_from (progressive resolution) with the encoder and VQ-VAE the source run recorded is silent; with
    others it warns, naming them (the run itself is legal: the schedule and architecture may change)."""
    import logging

    from models.checkpoint import load_pretrained_vqvae, save_pretrained
    from models.vqvae import VQVAE
    from tests.train_helpers import make_vqvae_dir, star_overrides
    from trainer.star_stage import StarStage
    vqvae_dir = make_vqvae_dir(tmp_path / "vqvae")

    def stage(**extra):
        return StarStage(load_config(RunConfig, None, star_overrides(tmp_path / "run", vqvae_dir, **{
            "text.tiny_layers": 1, **extra})), torch.device("cpu"))

    stage().export(tmp_path / "source", None)  # the lower-resolution run
    torch.manual_seed(3)
    save_pretrained(tmp_path / "other_vqvae", vqvae=VQVAE(load_pretrained_vqvae(vqvae_dir).cfg))
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("star").addHandler(handler)
    try:
        stage(**{"loop.init_from": str(tmp_path / "source"), "model.drop_path_rate": 0.2})
        assert warnings == []
        stage(**{"loop.init_from": str(tmp_path / "source"), "text.tiny_layers": 2,
                 "star_train.vqvae": str(tmp_path / "other_vqvae")})
    finally:
        logging.getLogger("star").removeHandler(handler)
    assert len(warnings) == 2
    assert "was trained with text.tiny_layers=1, this run uses 2" in warnings[0]
    assert "was trained with another VQ-VAE than star_train.vqvae=" in warnings[1]


@pytest.mark.parametrize("override, match", [
    ("--star_train.sample_top_p=3", "top_p must lie in"),
    ("--star_train.sample_top_k=-2", "top_k must be >= 0"),
])
def test_exported_sampling_defaults_are_checked_at_load(override, match):
    """The settings a run exports with its pipeline fail at start-up, not hours later in its first sample."""
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, REPO / "configs" / "shapes_star.json", [override])
