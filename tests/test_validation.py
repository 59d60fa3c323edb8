"""loop.eval_every: validation metrics on held-out data, computed without touching training."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.train_helpers import final_state, history, make_vqvae_dir, run_train, star_overrides, vqvae_overrides
from trainer.config import RunConfig
from trainer.star_stage import StarStage
from utils.config import ConfigError, load_config
from utils.data.dataset import ImageTransform, ShapesDataset


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory):
    return make_vqvae_dir(tmp_path_factory.mktemp("vq") / "vqvae")


def _equal_states(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_star_validation_loss_is_the_held_out_cross_entropy_and_leaves_training_alone(tmp_path, vqvae_dir):
    common = {"optim.ema_decay": 0.0, "loop.log_every": 3}  # final weights = the weights at the last step
    plain = run_train(star_overrides(tmp_path / "plain", vqvae_dir, 4, **common))
    assert plain.returncode == 0, plain.stderr[-3000:]
    args = star_overrides(tmp_path / "val", vqvae_dir, 4, **common,
                          **{"loop.eval_every": 2, "loop.eval_samples": 6})
    val = run_train(args)
    assert val.returncode == 0, val.stderr[-3000:]
    # Training draws the same batches, dropout masks and weights with or without evaluations.
    assert _equal_states(final_state(tmp_path / "plain"), final_state(tmp_path / "val"))
    rows = {row["step"]: row for row in history(tmp_path / "val")}
    assert sorted(rows) == [2, 3, 4]  # rows at log steps and at evaluation steps
    assert "val_loss" not in rows[3] and {"val_loss", "val_acc", "val_loss_scale2"} <= set(rows[2]) <= set(rows[4])
    assert "validation: loss" in val.stderr
    # Independently: teacher-forced cross-entropy of the final weights over the first 6 held-out samples.
    cfg = load_config(RunConfig, None, args)
    stage = StarStage(cfg, torch.device("cpu"))
    stage.model.load_state_dict(final_state(tmp_path / "val"))
    stage.model.eval()
    data = ShapesDataset(6, ImageTransform(stage.resolution), "heldout", seed=cfg.loop.seed)
    items = [data[i] for i in range(6)]
    with torch.no_grad():
        gt = stage.encode_tokens(torch.stack([it["image"] for it in items]))
        var_input = stage.vqvae.idx_to_var_input(list(gt.split(stage.scale_sizes, dim=1)))
        hidden, mask, pooled = stage.text.encode([it["caption"] for it in items])
        logits, _ = stage.model(var_input, hidden, mask, pooled)
        ce = F.cross_entropy(logits.flatten(0, 1), gt.flatten())
        acc = (logits.argmax(-1) == gt).float().mean()
    assert math.isclose(rows[4]["val_loss"], ce.item(), rel_tol=1e-5)
    assert math.isclose(rows[4]["val_acc"], acc.item(), rel_tol=1e-6)
    assert rows[4]["val_loss"] != rows[2]["val_loss"]


def test_vqvae_validation_leaves_codebook_statistics_and_training_alone(tmp_path):
    base = vqvae_overrides(**{"loop.steps": 6, "loop.log_every": 2, "vqvae_train.restart_dead_every": 2})
    plain = run_train(base + [f"--loop.out_dir={tmp_path / 'plain'}"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    val = run_train(base + [f"--loop.out_dir={tmp_path / 'val'}", "--loop.eval_every=3", "--loop.eval_samples=8"])
    assert val.returncode == 0, val.stderr[-3000:]
    assert _equal_states(final_state(tmp_path / "plain"), final_state(tmp_path / "val"))  # usage EMA included
    rows = {row["step"]: row for row in history(tmp_path / "val")}
    assert sorted(rows) == [2, 3, 4, 6] and "val_psnr" in rows[3] and "val_psnr" in rows[6]
    assert all(math.isfinite(rows[s][k]) for s in (3, 6) for k in ("val_loss", "val_recon", "val_vq", "val_psnr"))


def test_lmdb_validation_needs_held_out_folders(tmp_path, vqvae_dir):
    args = star_overrides(tmp_path, vqvae_dir, **{"data.source": "lmdb", "data.lmdb_dirs": "[x]",
                                                  "loop.eval_every": 10})
    with pytest.raises(ConfigError, match="data.val_lmdb_dirs"):
        load_config(RunConfig, None, args)
