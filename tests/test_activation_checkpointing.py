"""Activation checkpointing (recomputing each STAR block in the backward pass) changes memory, not results."""
import torch
from torch.utils.data import DataLoader

from models.star import STAR, StarConfig
from tests.train_helpers import make_vqvae_dir, star_overrides
from train import build_dataset
from trainer.config import RunConfig
from trainer.star_stage import StarStage
from utils.config import load_config


def _grads_and_saved_bytes(model: STAR, inputs: tuple, keep=None, seed: int = 5):
    """One backward pass from a fixed RNG state: parameter gradients, logits, bytes of tensors autograd kept for
    the backward pass outside checkpointed regions, and how many times the blocks were entered (a recomputation
    stops early, once it has what the backward pass needs, so forward hooks would not see it)."""
    model.zero_grad(set_to_none=True)
    saved, calls = [0], [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    hooks = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in model.blocks]
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(*inputs, keep=keep)
    logits.logsumexp(-1).mean().backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, logits.detach(), saved[0], calls[0]


def test_checkpointed_blocks_give_identical_gradients_and_keep_fewer_activations():
    # drop_path 0.5 drops whole samples in most blocks: the recomputation must replay the same draws
    cfg = StarConfig(depth=4, width=64, num_heads=2, vocab_size=64, z_channels=8, text_dim=32, patch_nums=(1, 2, 4),
                     drop_path_rate=0.5)
    torch.manual_seed(0)
    model = STAR(cfg)
    model.init_weights()
    model.train()
    B, L = 3, cfg.seq_len
    inputs = (torch.randn(B, L - 1, 8), torch.randn(B, 5, 32), torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] + [0] * 4]),
              torch.randn(B, 32))
    keep = torch.ones(L, dtype=torch.bool)
    keep[[7, 11, 20]] = False
    for k in (None, keep):
        plain, logits, plain_bytes, plain_calls = _grads_and_saved_bytes(model, inputs, k)
        model.set_activation_checkpointing(True)
        ckpt, ckpt_logits, ckpt_bytes, ckpt_calls = _grads_and_saved_bytes(model, inputs, k)
        model.set_activation_checkpointing(False)
        assert plain_calls == cfg.depth and ckpt_calls == 2 * cfg.depth  # each block ran again in the backward
        assert torch.equal(logits, ckpt_logits)
        assert plain.keys() == ckpt.keys() and len(plain) == sum(p.requires_grad for p in model.parameters())
        assert all(torch.equal(plain[n], ckpt[n]) for n in plain)
        assert ckpt_bytes * 4 < plain_bytes, (ckpt_bytes, plain_bytes)
        _, other_logits, _, _ = _grads_and_saved_bytes(model, inputs, k, seed=6)
        assert not torch.equal(other_logits, logits)  # the drop-path draws matter, so replaying them was tested


def test_config_switch_reaches_the_model_and_leaves_eval_untouched(tmp_path):
    args = star_overrides(tmp_path / "run", make_vqvae_dir(tmp_path / "vq"),
                          **{"star_train.activation_checkpointing": "true"})
    cfg = load_config(RunConfig, None, args)
    stage = StarStage(cfg, torch.device("cpu"))
    assert stage.model.activation_checkpointing
    batch = next(iter(DataLoader(build_dataset(cfg, cfg.resolution), batch_size=4)))
    calls = [0]
    stage.model.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    stage.model.train()
    torch.manual_seed(1)
    stage.loss(stage.model, batch)[0].backward()
    assert calls[0] == 2
    with torch.no_grad():  # no graph, nothing to recompute
        stage.loss(stage.model, batch)
    assert calls[0] == 3
