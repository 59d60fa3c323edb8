"""metrics/reconstruction.py against independent references, and scripts/eval_vqvae.py on packed images (one
corrupt record) and on shapes samples."""
import json
import math

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from metrics.fid import feature_stats, frechet_distance
from metrics.reconstruction import CodebookUsage, gaussian_window, psnr_per_image, ssim_per_image
from models.checkpoint import load_pretrained_vqvae
from tests.helpers import REPO, StandInInception, load_script
from tests.train_helpers import make_vqvae_dir
from utils.data.dataset import ImageTransform
from utils.data.pack import PackOptions, pack, shapes_items
from utils.data.records import encode_record, record_key


def naive_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two (C, H, W) images in float64, window by window, from the definition."""
    w = gaussian_window().numpy()
    k = w.shape[0]
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - k + 1):
            for j in range(x.shape[2] - k + 1):
                a, b = x[c, i:i + k, j:j + k], y[c, i:i + k, j:j + k]
                mu_a, mu_b = (w * a).sum(), (w * b).sum()
                var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
                cov = (w * (a - mu_a) * (b - mu_b)).sum()
                c1, c2 = 0.01 ** 2, 0.03 ** 2
                luminance = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
                values.append(luminance * (2 * cov + c2) / (var_a + var_b + c2))
    return float(np.mean(values))


def test_ssim_equals_the_definition_window_by_window():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 14, 15, generator=g, dtype=torch.float64)
    rec = (img + 0.2 * torch.randn(2, 3, 14, 15, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim_per_image(rec, img)
    for n in range(2):
        assert ours[n].item() == pytest.approx(naive_ssim(rec[n].numpy(), img[n].numpy()), abs=1e-12)


def test_ssim_and_psnr_closed_forms():
    img = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim_per_image(img, img), torch.ones(3, dtype=torch.float64))
    a, b, c1 = 0.3, 0.7, 0.01 ** 2  # flat images: no variance, so SSIM is the luminance term alone
    flat = ssim_per_image(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b))
    assert flat.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-6)
    shifted = img * 0.8 + 0.1
    assert psnr_per_image(shifted + 0.1, shifted) == pytest.approx([20.0] * 3, abs=1e-4)  # MSE 0.01
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_per_image(img[..., :8, :8], img[..., :8, :8])


def test_codebook_usage_counts_codes_per_scale_and_overall():
    g = torch.Generator().manual_seed(2)
    maps = [torch.randint(0, 5, (4, 1), generator=g), torch.randint(3, 12, (4, 9), generator=g)]
    usage = CodebookUsage(2, 16)
    usage.add(maps[:1] + maps[1:])
    usage.add([m.flip(0) for m in maps])
    summary = usage.summary()
    assert summary["used_fraction_per_scale"] == [len(np.unique(m)) / 16 for m in maps]
    every = torch.cat([m.flatten() for m in maps] * 2).numpy()
    assert summary["used_fraction"] == len(np.unique(every)) / 16
    p = np.bincount(every) / len(every)
    assert summary["perplexity"] == pytest.approx(math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))


def test_eval_vqvae_on_packed_images_skips_a_corrupt_record_once(tmp_path, capsys):
    pack(shapes_items(7, "heldout", size=8), tmp_path / "data", PackOptions())
    env = lmdb.open(str(tmp_path / "data" / "shard-00000"), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(record_key(2), encode_record({"key": "bad", "captions": {"caption": "x"}}, b"garbage"))
    env.close()
    vqvae_dir = make_vqvae_dir(tmp_path / "vqvae")
    eval_vqvae = load_script("eval_vqvae")
    argv = ["--vqvae", str(vqvae_dir), "--lmdb", str(tmp_path / "data"), "--count", "6", "--batch", "4",
            "--out", str(tmp_path / "report.json")]
    assert eval_vqvae.main(argv, extractor=StandInInception()) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["count"] == 5 and report["data"]["skipped"] == 1 and report["ssim"] is None  # 8x8: no SSIM
    # The reference: records 0, 1, 3, 4, 5 as training would see them, PSNR from its formula.
    from utils.data.dataset import LMDBImageTextDataset
    data = LMDBImageTextDataset([tmp_path / "data"], ImageTransform(8))
    img = torch.stack([data[i]["image"] for i in (0, 1, 3, 4, 5)])
    vae = load_pretrained_vqvae(vqvae_dir)
    with torch.no_grad():
        tokens = vae.img_to_idx(img)
        rec = vae.idx_to_img(tokens)
    mse = ((rec - img) / 2).pow(2).flatten(1).mean(1)
    assert report["psnr_db"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-6)
    used = [len(torch.unique(t)) / vae.cfg.vocab_size for t in tokens]
    assert report["codebook"]["used_fraction_per_scale"] == pytest.approx(used)
    features = StandInInception()
    expected = frechet_distance(*feature_stats(features(img.add(1).div(2))),
                                *feature_stats(features(rec.add(1).div(2))))
    assert report["rfid"] == pytest.approx(expected, rel=1e-6) and report["rfid"] > 0


def test_eval_vqvae_on_shapes_judges_and_draws_the_grid(tmp_path, capsys):
    eval_vqvae = load_script("eval_vqvae")
    argv = ["--config", str(REPO / "configs" / "shapes_vqvae.json"), "--count", "3", "--grid", str(tmp_path / "g.png")]
    assert eval_vqvae.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 3 and 0 < report["ssim"] < 1 and "rfid" not in report
    assert report["judge_on_reconstructions"]["overall"]["n"] == 3
    assert Image.open(tmp_path / "g.png").size == (3 * 66 + 2, 2 * 66 + 2)  # originals over reconstructions


def test_eval_vqvae_refuses_rfid_on_one_image_before_any_work(tmp_path, capsys):
    """Was numpy's covariance error after every image had been reconstructed (and the report lost)."""
    eval_vqvae = load_script("eval_vqvae")
    with pytest.raises(SystemExit):
        eval_vqvae.main(["--vqvae", str(tmp_path / "missing"), "--count", "1", "--inception-weights", "w.pth"])
    assert "rFID needs --count >= 2" in capsys.readouterr().err
