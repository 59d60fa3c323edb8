"""The VQ-VAE against the official implementation: golden tensors and the released checkpoint layout."""
import torch

from metrics.parity import build_reference_vqvae
from models import build_vqvae, vqvae_config
from models.quant import phi_index_table
from tests.helpers import manifest_param_count, read_manifest, run_check_parity


def test_check_parity_vae_passes(reference_dir):
    rc, result = run_check_parity(reference_dir, "vae")
    part = result["parts"]["vae"]
    failed = {k: v for k, v in part["tensors"].items() if not v["ok"]}
    assert rc == 0 and result["pass"] and not failed, failed
    # Every golden tensor was compared; indices exactly, floats within 1e-5.
    assert {"f", "var_input", "rec_img", "rec_img_per_scale", "fhat_to_img"} <= set(part["tensors"])
    assert all(part["tensors"][f"idx_{s}"]["match"] == 1.0 for s in range(4))


def test_check_parity_fails_on_a_perturbed_reference(reference_dir, tmp_path):
    """The comparison can fail: a copy of the reference with one weight changed must not pass."""
    import shutil

    from safetensors.torch import load_file, save_file
    for f in reference_dir.glob("tiny_vae_*"):
        shutil.copy(f, tmp_path / f.name)
    state = load_file(str(tmp_path / "tiny_vae_state.safetensors"))
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 0.01
    save_file(state, str(tmp_path / "tiny_vae_state.safetensors"))
    rc, result = run_check_parity(tmp_path, "vae")
    assert rc == 1 and not result["pass"]
    assert not result["parts"]["vae"]["tensors"]["rec_img"]["ok"]


def test_full_size_state_dict_matches_the_released_layout(reference_dir):
    manifest = reference_dir / "manifest_vae_ch160v4096z32.txt"
    with torch.device("meta"):
        vae = build_vqvae(vqvae_config("vqvae-f16-c160", resolution=256))
    ours = [(k, list(v.shape)) for k, v in vae.state_dict().items()]
    assert ours == read_manifest(manifest)
    assert sum(p.numel() for p in vae.parameters()) == manifest_param_count(manifest) == 108_948_355


def test_phi_tables_resolve_float_ties_as_official():
    assert phi_index_table(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_table(14, 4) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]


def test_shorter_schedule_checkpoint_loads_into_longer_schedule_model(reference_dir):
    """As a 10-scale file into a 14-scale model: the per-scale usage buffer is replaced, the rest loads."""
    small = build_reference_vqvae(reference_dir)
    longer = build_vqvae(vqvae_config("vqvae-tiny", patch_nums=(1, 2, 3, 4, 5, 6)))
    longer.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(longer.quantize.embedding.weight, small.quantize.embedding.weight)
    assert longer.quantize.ema_vocab_hit_SV.shape == (6, small.cfg.vocab_size)


def test_tokenizer_round_trip_shapes():
    cfg = vqvae_config("vqvae-tiny", patch_nums=(1, 2, 3, 5))
    vae = build_vqvae(cfg).eval()
    img = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    idx = vae.img_to_idx(img)
    assert [t.shape for t in idx] == [(2, pn * pn) for pn in cfg.patch_nums]
    assert vae.idx_to_var_input(idx).shape == (2, sum(pn * pn for pn in cfg.patch_nums) - 1, cfg.z_channels)
    assert vae.idx_to_img(idx).shape == img.shape
    assert len(vae.idx_to_img(idx, every_scale=True)) == len(cfg.patch_nums)


def test_quantizer_ignores_autocast():
    """Quantization (training forward and tokenization) runs in fp32 under bf16 autocast, as VAR's quantizer:
    the same codes, f_hat and loss as without autocast."""
    cfg = vqvae_config("vqvae-tiny", patch_nums=(1, 2, 3, 5))
    q = build_vqvae(cfg).quantize
    f = torch.randn(2, cfg.z_channels, 5, 5, generator=torch.Generator().manual_seed(0))
    f_hat, loss, hits = q(f)
    idx = q.f_to_idx(f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_hat_bf, loss_bf, hits_bf = q(f)
        idx_bf = q.f_to_idx(f)
    assert f_hat_bf.dtype == torch.float32
    torch.testing.assert_close(f_hat_bf, f_hat, rtol=0, atol=0)
    torch.testing.assert_close(loss_bf, loss, rtol=0, atol=0)
    assert torch.equal(hits_bf, hits) and all(torch.equal(a, b) for a, b in zip(idx_bf, idx))
