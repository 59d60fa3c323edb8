"""scripts/quickstart.py in smoke mode (a few steps per stage): every stage runs, the outputs exist, the set-up
time is counted, and a second run reuses the finished stages."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_script


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


def _plan(qs, vqvae_eval_seconds: float) -> tuple[dict, dict]:
    """Budgets and stage times of a 20-minute run in which every training stage takes its budget plus the start-up
    allowance and the generation takes its allowance."""
    seconds = {"setup": 150.0, "parity": 4.0, "data": 15.0}
    budgets = {}
    for key in ("vqvae", "vqvae_eval", "star", "sampler", "generate_and_judge"):
        if key in qs.BUDGET_SHARES:
            budgets[key] = qs.stage_budget(key, 20, seconds)
            seconds[key] = budgets[key] + qs.STARTUP_SECONDS
        elif key == "vqvae_eval":
            seconds[key] = vqvae_eval_seconds
        else:
            seconds[key] = max(qs.EVAL_SECONDS[key], qs.GENERATE_PER_VQVAE_EVAL * vqvae_eval_seconds)
    return budgets, seconds


def test_budget_plan_fills_the_minutes_and_a_slow_machine_keeps_back_more():
    qs = load_script("quickstart")
    usual, usual_seconds = _plan(qs, 9.0)
    slow, slow_seconds = _plan(qs, 20.0)  # an evaluation over twice as slow: generation gets 130 s, not 60
    assert sum(usual_seconds.values()) == pytest.approx(20 * 60) == sum(slow_seconds.values())
    assert usual_seconds["generate_and_judge"] == 60 and slow_seconds["generate_and_judge"] == 130
    # the VQ-VAE is planned before the evaluation runs; STAR and the head give up the 11 + 70 s the slow machine's
    # evaluation and generation take longer
    assert slow["vqvae"] == usual["vqvae"]
    assert slow["star"] + slow["sampler"] == pytest.approx(usual["star"] + usual["sampler"] - (20 - 9) - (130 - 60))
