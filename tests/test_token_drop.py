"""Token dropping for high-resolution training: nested windows / random subsets, loss over kept tokens only."""
import torch

from metrics.flops import star_training_flops
from tests.train_helpers import make_vqvae_dir, star_overrides
from trainer.config import RunConfig
from trainer.star_stage import StarStage
from utils.config import load_config


def _stage(tmp_path, **extra):
    args = star_overrides(tmp_path / "run", make_vqvae_dir(tmp_path / "vq"), **{"model.patch_nums": "[1,2,4]",
                                                                                 "model.drop_path_rate": 0.0, **extra})
    return StarStage(load_config(RunConfig, None, args), torch.device("cpu"))


def test_window_drop_keeps_nested_windows_and_early_scales(tmp_path):
    stage = _stage(tmp_path, **{"star_train.token_drop": "window", "star_train.drop_from_scale": -2,
                                "star_train.keep_fraction": 0.5})
    torch.manual_seed(0)
    keep = stage.keep_mask()
    # scales 0 (1 token) kept; scale 1 (2x2) keeps a 1x1 window; scale 2 (4x4) keeps a 2x2 window
    assert keep[:1].all() and keep[1:5].sum() == 1 and keep[5:].sum() == 4
    r1 = int(keep[1:5].nonzero()) // 2
    rows2 = sorted({int(i) // 4 for i in keep[5:].nonzero()})
    assert len(rows2) == 2 and (rows2[0] // 2 == r1 or rows2[1] // 2 == r1)  # windows overlap across scales


def _loss_and_its_keep_mask(stage, captions: list[str], seed: int):
    """One training loss on random images, and the keep mask that step drew (replayed from the same seed)."""
    batch = {"image": torch.rand(len(captions), 3, 8, 8) * 2 - 1, "caption": captions}
    torch.manual_seed(seed)
    loss, metrics = stage.loss(stage.model, batch)
    torch.manual_seed(seed)
    return batch, loss, metrics, stage.keep_mask()


def test_loss_is_averaged_over_kept_tokens_and_early_logits_are_unchanged(tmp_path):
    stage = _stage(tmp_path, **{"star_train.token_drop": "random", "star_train.drop_from_scale": 2,
                                "star_train.keep_fraction": 0.25})
    batch, loss, metrics, keep = _loss_and_its_keep_mask(stage, ["a red circle at the top left", ""], seed=1)
    assert keep.sum() == 5 + 4  # scales 0-1 (5 tokens) + 4 of the 16 last-scale tokens
    gt, var_input = stage.tokens(batch)
    text = stage.text.encode(batch["caption"])
    full, _ = stage.model(var_input, *text)
    dropped, _ = stage.model(var_input, *text, keep=keep)
    assert torch.allclose(dropped[:, :5], full[:, :5], atol=1e-6)  # block-causal: early scales see no dropped token
    ce = torch.nn.functional.cross_entropy(dropped.flatten(0, 1), gt[:, keep].flatten())
    assert torch.allclose(loss, ce) and metrics["tokens"] == 2 * 9
    assert metrics["flops"] == star_training_flops(stage.cfg.model, 2, 9, text[0].shape[1])  # kept tokens only


def test_scale_balanced_loss_is_the_mean_of_per_scale_means(tmp_path):
    for drop in ("none", "random"):
        stage = _stage(tmp_path / drop, **{"star_train.loss_weighting": "scale", "star_train.token_drop": drop,
                                           "star_train.drop_from_scale": 2, "star_train.keep_fraction": 0.25})
        batch, loss, metrics, keep = _loss_and_its_keep_mask(stage, ["a red circle at the top left", "a blue square"],
                                                             seed=3)
        gt, var_input = stage.tokens(batch)
        logits, _ = stage.model(var_input, *stage.text.encode(batch["caption"]), keep=keep)
        keep = torch.ones(1 + 4 + 16, dtype=torch.bool) if keep is None else keep
        gt, scale = gt[:, keep], torch.tensor([0] + [1] * 4 + [2] * 16)[keep]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), gt.flatten(), reduction="none").view(gt.shape)
        per_scale = [ce[:, scale == s].mean() for s in range(3)]
        assert torch.allclose(loss, torch.stack(per_scale).mean(), atol=1e-5), drop
        assert metrics["tokens"] == 2 * keep.sum()
