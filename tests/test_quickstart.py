"""scripts/quickstart.py in smoke mode (a few steps per stage): every stage runs, the outputs exist, the set-up
time is counted, and a second run reuses the finished stages."""
import json
import os
import subprocess
import sys

from tests.helpers import REPO


def test_quickstart_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "scripts" / "quickstart.py"), "--smoke", "--out", str(tmp_path / "qs")]
    proc = subprocess.run([*cmd, "--setup-seconds", "7"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "qs"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stage_seconds"]) >= {"data", "vqvae", "star", "sampler", "generate_and_judge"}
    assert summary["stage_seconds"]["setup"] == 7 and summary["total_seconds"] > 7
    assert summary["vqvae_reconstruction"]["psnr_db"] > 0
    for run in ("with_sampler", "without_sampler"):
        assert {"one", "two", "overall"} <= set(summary["judge"][run])
    for f in ("samples_grid.png", "judge/judge.json", "pipeline/sampler.safetensors", "pipeline/config.json",
              "loss_curve_star.png"):
        assert (out / f).is_file(), f
    assert list((out / "star" / "tb").iterdir())
    assert "target one" in proc.stdout
    assert "time" not in summary["targets"]  # the 20-minute target is the default run's, not --smoke's
    again = subprocess.run([*cmd, "--setup-seconds", "0"], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing") >= 5
    # the run's clock started with the first invocation's set-up
    assert json.loads((out / "summary.json").read_text())["stage_seconds"]["setup"] == 7
