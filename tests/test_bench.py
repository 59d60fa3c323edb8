"""The benchmark CLIs keep their JSON contract (numbers are reported, not asserted), and the analytic FLOP
formulas agree with counting the matmuls of a real generation and a real training step."""
import json
import subprocess
import sys

import pytest
import torch

from metrics.flops import star_generation_flops, star_training_flops, vqvae_decode_flops
from models import build_star, build_vqvae, star_config, vqvae_config
from models import conv as conv_module
from models import linear as linear_module
from tests.helpers import REPO


def test_bench_suite_collects_every_script_json(tmp_path):
    """The smoke suite runs bench_generate.py (with and without a sampler head) and bench_train.py (with and
    without activation checkpointing) on star-tiny; each keeps its JSON contract, and the suite gathers them."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_suite.py"), "--suite", "smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    names = [e["name"] for e in report["entries"]]
    assert names == ["gen_tiny", "gen_tiny_sampler", "train_tiny", "train_tiny_ckpt"]
    for entry in report["entries"]:
        out = entry["result"]
        assert entry["status"] == "ok" and out["seconds_median"] > 0 and out["peak_rss_gb"] > 0
        assert "tokens_per_s" in out and out["matmul_gflops_per_s"] > 0 and out["threads"] == 1
        assert entry["name"] in proc.stdout  # the Markdown table
    assert report["entries"][1]["result"]["sampler"] and report["entries"][3]["result"]["activation_checkpointing"]
    generation = report["entries"][0]["result"]
    assert generation["vqvae_decode_flops"] > 0 and generation["seconds_at_matmul_peak"] > 0


def test_bench_suite_records_failed_and_skipped_entries(tmp_path):
    """A failing entry (here: parity against an empty reference folder) is recorded with its error and makes the
    suite exit 1; a missing reference folder skips the parity entry; --only rejects names outside the suite."""
    script = str(REPO / "scripts" / "bench_suite.py")

    def run(*args):
        return subprocess.run([sys.executable, script, "--suite", "gpu", "--out", str(tmp_path / "out"), *args],
                              capture_output=True, text=True, timeout=300)

    empty = tmp_path / "empty"
    empty.mkdir()
    for ref, status, code in ((empty, "failed", 1), (tmp_path / "missing", "skipped", 0)):
        proc = run("--only", "parity_cuda", "--reference-dir", str(ref))
        assert proc.returncode == code, proc.stderr
        entry = json.loads((tmp_path / "out" / "results.json").read_text())["entries"][0]
        assert entry["status"] == status and entry["error"] and str(ref) in entry["command"]
    proc = run("--only", "nope")
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_generation_flop_formula_matches_counted_matmuls(monkeypatch):
    """torch's FlopCounterMode over one guided generation (VQ-VAE decode excluded). SDPA runs on its math
    backend and linear layers on F.linear, so both appear as matmuls the counter sees (it counts neither the
    fused CPU attention kernel nor oneDNN's inner product, which models.linear uses for few rows)."""
    monkeypatch.setattr(linear_module, "_HAVE_ONEDNN", False)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = star_config("star-tiny")
    star, vae = build_star(cfg).eval(), build_vqvae(vqvae_config("vqvae-tiny")).eval()
    B, T = 2, 77
    rows = 2 * B  # prompts + unconditional
    text = (torch.randn(rows, T, cfg.text_dim), torch.ones(rows, T, dtype=torch.long), torch.randn(rows, cfg.text_dim))
    vae.fhat_to_img = lambda f: f.new_zeros(f.shape[0], 3, 1, 1)  # exclude the decoder from the count
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        star.generate(vae, *text, cfg=4.0, top_k=1, generator=torch.Generator().manual_seed(0))
    counted = counter.get_total_flops()
    analytic = star_generation_flops(cfg, B, T)
    assert abs(counted - analytic) / counted < 0.002, (counted, analytic)  # the rest: the VQ-VAE's phi convs


def test_decode_flop_formula_matches_counted_convolutions(monkeypatch):
    """The decoder formula against FlopCounterMode: the tiny reference VAE, the shapes tokenizer's layout (one
    res-block per level) and VAR's layout on a 4x4 latent (64^2 image), at batch 2. The convolutions run as
    ``F.conv2d`` (the counter does not count NNPACK's Winograd op, which models.conv uses for wide maps)."""
    monkeypatch.setattr(conv_module, "_HAVE_NNPACK", False)
    from torch.utils.flop_counter import FlopCounterMode
    for cfg in (vqvae_config("vqvae-tiny"),
                vqvae_config("vqvae-tiny", ch_mult=(1, 1, 2, 4), num_res_blocks=1, patch_nums=(1, 2, 4, 8)),
                vqvae_config("vqvae-f16-c160", patch_nums=(1, 2, 4))):
        vae = build_vqvae(cfg).eval()
        f_hat = torch.randn(2, cfg.z_channels, cfg.patch_nums[-1], cfg.patch_nums[-1])
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.fhat_to_img(f_hat)
        assert counter.get_total_flops() == vqvae_decode_flops(cfg, 2), cfg


def test_training_flop_formula_matches_counted_matmuls():
    """One teacher-forced forward + backward (SDPA on its math backend), with all tokens and with a third of
    them dropped: the analytic count equals what FlopCounterMode sees."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = star_config("star-tiny")
    star = build_star(cfg).train()
    B, T, L = 3, 77, cfg.seq_len
    inputs = (torch.randn(B, L - 1, cfg.z_channels), torch.randn(B, T, cfg.text_dim),
              torch.ones(B, T, dtype=torch.long), torch.randn(B, cfg.text_dim))
    for keep in (None, torch.arange(L) % 3 != 1):
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            logits, _ = star(*inputs, keep=keep)
            logits.logsumexp(-1).mean().backward()
        tokens = None if keep is None else int(keep.sum())
        assert counter.get_total_flops() == star_training_flops(cfg, B, tokens, T)


def test_paired_fraction_pairs_each_run_with_its_own_matmul_rate():
    from metrics.bench import paired_fraction
    # 100 GFLOP; the machine halves its speed between runs, and the matmul timed after each run shows it
    assert paired_fraction(100e9, [1.0, 2.0, 4.0], [200.0, 100.0, 50.0]) == 0.5
    assert paired_fraction(100e9, [1.0, 2.0, 1.0], [100.0, 100.0, 50.0]) == 1.0  # the median of 1, 0.5, 2


@pytest.mark.parametrize("argv, message", [
    (["--size", "star-d17"], "argument --size: invalid choice"),            # was a KeyError traceback
    (["--size", "star-d16", "--resolution", "300"], "argument --resolution: invalid choice"),
    (["--size", "star-tiny", "--resolution", "1024"], "star-tiny has its own 64x64 schedule"),  # was ignored
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_bench_flags_are_checked_before_anything_runs(monkeypatch, capsys, argv, message):
    from metrics.bench import bench_parser, parse_bench_args
    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    with pytest.raises(SystemExit):
        parse_bench_args(bench_parser("", batch=1, cfg=4.0))
    assert message in capsys.readouterr().err


def test_bench_resolution_defaults_to_256_and_is_none_for_the_tiny_size(monkeypatch):
    from metrics.bench import bench_parser, parse_bench_args
    for argv, expected in ((["--size", "star-d16"], "256"), (["--size", "star-tiny"], None)):
        monkeypatch.setattr(sys, "argv", ["bench", *argv])
        assert parse_bench_args(bench_parser("", batch=1, cfg=4.0))[0].resolution == expected
