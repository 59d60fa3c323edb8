import subprocess
import sys

import pytest
import torch

from metrics.parity import _load, build_reference_vqvae, reference_star_config
from models.checkpoint import (
    CheckpointError,
    adapt_official_state_dict,
    describe_official_state_dict,
    load_official_star,
    load_pretrained_star,
    load_pretrained_vqvae,
    read_official_state_dict,
    save_pretrained,
)
from models.star import STAR
from tests.helpers import REPO, read_manifest


@pytest.fixture(scope="module")
def official(reference_dir):
    import json
    meta = json.loads((reference_dir / "tiny_star_golden.json").read_text())
    return reference_star_config(meta), _load(reference_dir / "tiny_star_state.safetensors")


def _logits(model, g):
    with torch.no_grad():
        return model(g["var_input"], g["enc_hidden"][:2], g["enc_mask"][:2], g["enc_pooled"][:2])[0]


def test_official_trainer_dict_with_prefixes_loads_and_reproduces_logits(official, reference_dir, tmp_path):
    cfg, state = official
    g = _load(reference_dir / "tiny_star_golden.safetensors")
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save({"epoch": 1, "trainer": {"var_wo_ddp": {f"module._orig_mod.{k}": v for k, v in state.items()}}}, path)
    model = load_official_star(path, config=cfg)
    assert (_logits(model, g) - g["logits"]).abs().max() <= 1e-5


def test_save_pretrained_round_trip(official, reference_dir, tmp_path):
    cfg, state = official
    star = STAR(cfg).eval()
    star.load_state_dict(state)
    vae = build_reference_vqvae(reference_dir)
    save_pretrained(tmp_path / "ckpt", star, vae)
    star2, vae2 = load_pretrained_star(tmp_path / "ckpt"), load_pretrained_vqvae(tmp_path / "ckpt")
    assert star2.cfg == star.cfg and vae2.cfg == vae.cfg
    for a, b in zip(star.state_dict().values(), star2.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("ckpt/.*.tmp"))  # atomic writes leave no temporaries


def test_mismatch_is_one_readable_error(official, tmp_path):
    cfg, state = official
    bad = dict(state)
    bad.pop("encoder_proj.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["word_embed.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as e:
        adapt_official_state_dict(bad, STAR(cfg))
    msg = str(e.value)
    assert "missing (1): encoder_proj.bias" in msg and "unexpected (1): extra.weight" in msg
    assert "word_embed.weight: checkpoint [3, 3] vs model [128, 8]" in msg
    assert f"the checkpoint holds: depth {cfg.depth}, width {cfg.width}" in msg and "presets of that shape: none" in msg
    partial = adapt_official_state_dict(bad, STAR(cfg), allow_partial=True)
    assert "extra.weight" not in partial and "word_embed.weight" not in partial


@pytest.mark.parametrize("manifest, presets", [
    ("manifest_star_d16.txt", "star-d16-256"),
    ("manifest_star_d30.txt", "star-d30-1024"),  # 14 scales: only the 1024 schedule has that many
])
def test_a_mismatch_names_what_the_file_holds_and_the_presets_that_fit(reference_dir, manifest, presets):
    """Shapes from the official key manifests (meta tensors: nothing allocated)."""
    state = {k: torch.empty(shape, device="meta") for k, shape in read_manifest(reference_dir / manifest)}
    text = describe_official_state_dict(state)
    assert text.endswith(f"presets of that shape: {presets}"), text
    assert describe_official_state_dict({"x": torch.zeros(1)}).startswith("the file holds no STAR transformer")


def test_longer_schedule_grows_level_embedding(official):
    cfg, state = official
    import dataclasses
    longer = STAR(dataclasses.replace(cfg, patch_nums=(1, 2, 3, 4, 6)))
    adapted = adapt_official_state_dict(state, longer, generator=torch.Generator().manual_seed(0))
    assert adapted["lvl_embed.weight"].shape == (5, cfg.width)
    assert torch.equal(adapted["lvl_embed.weight"][:4], state["lvl_embed.weight"])
    assert adapted["lvl_embed.weight"][4].std() > 0
    longer.load_state_dict(adapted, strict=True)


def test_truncated_checkpoint_is_a_clear_error(official, tmp_path):
    cfg, state = official
    path = tmp_path / "x.pth"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read"):
        read_official_state_dict(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_official_state_dict(tmp_path / "missing.pth")


def test_convert_official_cli_needs_a_preset(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_official.py"), "--ckpt", "x.pth",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--preset" in proc.stderr
