"""FlexAttention for training self-attention: the BlockMask hides exactly what the dense block-causal mask hides.

PyTorch has FlexAttention's backward (and its compiled kernels for training) only on CUDA; on the CPU its eager
reference runs the forward pass, which is enough to check the mask: with it, a teacher-forced pass must give the
SDPA logits, with all tokens and with a random subset kept (token dropping).
"""
import pytest
import torch

from models import build_star, star_config
from tests.train_helpers import make_vqvae_dir, star_overrides
from trainer.config import RunConfig
from trainer.star_stage import StarStage
from utils.config import ConfigError, load_config

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _inputs(cfg, B=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0  # padding in the text of one row (cross-attention keeps its additive bias)
    return (torch.randn(B, cfg.seq_len - 1, cfg.z_channels, generator=g), torch.randn(B, T, cfg.text_dim, generator=g),
            mask, torch.randn(B, cfg.text_dim, generator=g))


@pytest.mark.parametrize("drop", [False, True])
def test_flex_block_mask_gives_the_sdpa_logits(drop):
    cfg = star_config("star-tiny")
    torch.manual_seed(0)
    model = build_star(cfg).eval()
    keep = None
    if drop:  # token dropping: the first scales and a random half of the rest
        keep = torch.ones(cfg.seq_len, dtype=torch.bool)
        first = model.scale_begins[2]
        keep[first:] = torch.rand(cfg.seq_len - first, generator=torch.Generator().manual_seed(1)) < 0.5
    inputs = _inputs(cfg)
    with torch.no_grad():
        dense, _ = model(*inputs, keep=keep)
        model.set_attention_kernel("flex")
        flex, _ = model(*inputs, keep=keep)
    assert dense.shape[1] == (cfg.seq_len if keep is None else int(keep.sum()))
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    # a mask that is wrong anywhere shows: all-visible attention gives other logits
    with torch.no_grad():
        model.set_attention_kernel("sdpa")
        model.block_causal_mask = lambda keep=None: None
        unmasked, _ = model(*inputs, keep=keep)
    assert (unmasked - dense).abs().max() > 1e-2


def test_full_sequence_block_mask_is_built_once():
    model = build_star(star_config("star-tiny"))
    first = model.flex_block_mask()
    assert model.flex_block_mask() is first
    keep = torch.ones(model.cfg.seq_len, dtype=torch.bool)
    keep[-1] = False
    assert model.flex_block_mask(keep) is not first  # per-step masks are not cached
    with pytest.raises(ConfigError, match="sdpa"):
        model.set_attention_kernel("flash")


def test_flex_is_refused_for_cpu_training_and_unknown_kernels(tmp_path):
    vq = make_vqvae_dir(tmp_path / "vq")
    cfg = load_config(RunConfig, None, star_overrides(tmp_path / "run", vq, **{"star_train.attention": "flex"}))
    with pytest.raises(ConfigError, match="CUDA"):
        StarStage(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="star_train.attention"):
        load_config(RunConfig, None, star_overrides(tmp_path / "run", vq, **{"star_train.attention": "flash"}))


def test_flex_gets_one_dtype_under_autocast(monkeypatch):
    """Under CUDA autocast the normalised keys come out fp32 next to bf16 queries and values (SDPA casts them
    itself, FlexAttention does not): ``attention`` hands FlexAttention one dtype, the queries'."""
    from torch.nn.attention.flex_attention import create_block_mask

    from models import attention as attention_module
    seen = []

    def recording_flex(compiled):
        def flex(q, k, v, block_mask, scale):
            seen.append((q.dtype, k.dtype, v.dtype))
            return q
        return flex

    monkeypatch.setattr(attention_module, "_flex_attention", recording_flex)
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4, 4, device="cpu")
    q, v = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16), torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    attention_module.attention(q, torch.randn(1, 1, 4, 8), v, mask, scale=1.0)
    assert seen == [(torch.bfloat16,) * 3]
