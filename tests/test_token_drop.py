"""Token dropping for high-resolution training: nested windows / random subsets, loss over kept tokens only."""
import torch

from metrics.flops import star_training_flops
from tests.helpers import HostReads
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


def test_token_metrics_equal_per_scale_selection_and_read_the_device_once(tmp_path):
    """Per-scale cross-entropy and accuracy against a naive selection per scale, with all tokens and with a kept
    subset that leaves scale 1 empty (NaN there); and no per-scale host reads (.item(), boolean indexing)."""
    import math

    import torch.nn.functional as F

    stage = _stage(tmp_path)
    torch.manual_seed(0)
    lvl_all = stage.scale_of_token  # (21,) scales 0, 1 x4, 2 x16
    for kept in (torch.ones(21, dtype=torch.bool), torch.tensor([True] + [False] * 4 + [True, False] * 8)):
        lvl = lvl_all[kept]
        logits, gt = torch.randn(3, len(lvl), 64), torch.randint(64, (3, len(lvl)))
        gt[0, :4] = logits[0, :4].argmax(-1)  # some right answers
        with HostReads() as reads:
            metrics = stage.token_metrics(logits, gt, lvl)
        assert reads.ops == []
        ce = F.cross_entropy(logits.transpose(1, 2), gt, reduction="none")
        correct = (logits.argmax(-1) == gt).float()
        assert math.isclose(metrics["acc"], correct.mean().item(), rel_tol=1e-6)
        for s in range(3):
            sel = [i for i in range(len(lvl)) if lvl[i] == s]
            if not sel:
                assert math.isnan(metrics[f"loss_scale{s}"]) and math.isnan(metrics[f"acc_scale{s}"])
                continue
            assert math.isclose(metrics[f"loss_scale{s}"], ce[:, sel].mean().item(), rel_tol=1e-6)
            assert math.isclose(metrics[f"acc_scale{s}"], correct[:, sel].mean().item(), rel_tol=1e-6, abs_tol=1e-7)
