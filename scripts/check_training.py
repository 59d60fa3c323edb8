#!/usr/bin/env python
"""Run the training loop end to end on this machine's device through train.py; prints one JSON object.

    python scripts/check_training.py [--precision bf16] [--steps 12] [--out DIR]

Tiny models on the built-in shapes data (nothing to download or pack; needs only torch and transformers, so it
runs on a GPU machine's own Python). train.py uses CUDA when there is one. Three things are checked:
  1. a VQ-VAE trains (loss falls, PSNR logged) and exports;
  2. a STAR transformer on it trains with validation every ``--steps``/2 steps (finite ``val_*``, loss falls);
  3. the same STAR run, sent SIGTERM a third of the way in, stops with exit code 143 and a checkpoint of the step
     it stopped at, and the re-run resumes from it to the end. ``resume_max_abs_diff`` compares its final weights
     with the uninterrupted run's: 0 on a CPU (exact resume); on a GPU non-deterministic kernels may leave ~1e-6.
Exit code 1 if a check fails (``failures`` names it).
"""
import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from trainer.loop import read_history  # noqa: E402
from utils import cli  # noqa: E402

TINY_VQVAE = {"vqvae.vocab_size": 64, "vqvae.z_channels": 8, "vqvae.ch": 32, "vqvae.ch_mult": "[1,2]",
              "vqvae.patch_nums": "[1,2,4]"}
TINY_STAR = {"stage": "star", "model.depth": 2, "model.width": 64, "model.num_heads": 2, "model.vocab_size": 64,
             "model.z_channels": 8, "model.text_dim": 64, "model.patch_nums": "[1,2,4]", "optim.lr": 3e-3,
             "optim.warmup_steps": 2, "text.encoder": "tiny", "text.tiny_layers": 1}


def train_command(out_dir: Path, settings: dict) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *(f"--{k}={v}" for k, v in settings.items()),
            f"--loop.out_dir={out_dir}"]


def history(out_dir: Path) -> list[dict]:
    return read_history(out_dir / "log.txt")  # a line being written while we poll is skipped


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for the runs, emptied first (default: a temporary one)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--steps", type=cli.positive_int, default=12, help="optimizer steps of each run (at least 6)")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per train.py run")
    args = p.parse_args()
    if args.steps < 6:
        p.error("--steps must be at least 6 (two validations and a stop a third of the way in)")
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="check_training_") as tmp:
            return check(args, Path(tmp))
    shutil.rmtree(args.out, ignore_errors=True)
    return check(args, args.out)


def check(args: argparse.Namespace, out: Path) -> int:
    common = {**TINY_VQVAE, "data.shapes_count": 256, "loop.batch_size": 8, "loop.precision": args.precision,
              "loop.steps": args.steps, "loop.log_every": 1, "loop.ckpt_every": 1000}
    report: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "precision": args.precision, "steps": args.steps, "seconds": {}}
    failures: list[str] = []

    def timed(name: str, cmd: list[str]) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        proc = run(cmd, args.timeout)
        report["seconds"][name] = round(time.perf_counter() - t0, 2)
        if proc.returncode != 0:
            failures.append(f"{name}: exit code {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
        return proc

    # 1. VQ-VAE
    vqvae_dir = out / "vqvae"
    timed("vqvae", train_command(vqvae_dir, {**common, "stage": "vqvae", "optim.lr": 2e-3}))
    rows = history(vqvae_dir)
    report["vqvae_loss_first_last"] = [rows[0]["loss"], rows[-1]["loss"]] if rows else None
    report["vqvae_psnr_last"] = rows[-1].get("psnr") if rows else None
    if not rows or not rows[-1]["loss"] < rows[0]["loss"]:
        failures.append("vqvae: the loss did not fall")
    if failures:
        print(json.dumps({**report, "failures": failures}, indent=1))
        return 1

    # 2. STAR with validation, uninterrupted
    star = {**common, **TINY_STAR, "star_train.vqvae": vqvae_dir / "final", "loop.eval_every": args.steps // 2,
            "loop.eval_samples": 16}
    full_dir, cut_dir = out / "star_full", out / "star_cut"
    timed("star", train_command(full_dir, star))
    rows = history(full_dir)
    report["star_loss_first_last"] = [rows[0]["loss"], rows[-1]["loss"]] if rows else None
    validation = {r["step"]: {k: v for k, v in r.items() if k.startswith("val_") and "_scale" not in k}
                  for r in rows if "val_loss" in r}
    report["validation"] = validation
    if not rows or not rows[-1]["loss"] < rows[0]["loss"]:
        failures.append("star: the loss did not fall")
    if sorted(validation) != [args.steps // 2, args.steps] or not all(
            torch.isfinite(torch.tensor(list(v.values()))).all() for v in validation.values()):
        failures.append(f"star: validation rows missing or not finite: {validation}")

    # 3. the same run stopped by SIGTERM, then resumed
    t0 = time.perf_counter()
    proc = subprocess.Popen(train_command(cut_dir, star), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and time.perf_counter() - t0 < args.timeout and len(history(cut_dir)) < args.steps // 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=args.timeout)
    report["seconds"]["star_stopped"] = round(time.perf_counter() - t0, 2)
    checkpoints = sorted(int(c.name[5:13]) for c in cut_dir.glob("ckpt-*.pt"))
    report["stop_exit_code"], report["stopped_at_step"] = proc.returncode, checkpoints
    if proc.returncode != 128 + signal.SIGTERM or len(checkpoints) != 1 or checkpoints[0] >= args.steps:
        failures.append(f"stop: exit code {proc.returncode}, checkpoints at {checkpoints}: "
                        f"{(stderr.strip().splitlines() or [''])[-1]}")
    else:
        timed("star_resumed", train_command(cut_dir, star))
        a = load_file(str(full_dir / "final" / "model.safetensors"))
        b = load_file(str(cut_dir / "final" / "model.safetensors")) if (cut_dir / "final").is_dir() else {}
        if set(a) != set(b):
            failures.append("resume: the resumed run exported no (or other) weights")
        else:
            report["resume_max_abs_diff"] = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            report["resume_identical"] = all(torch.equal(a[k], b[k]) for k in a)
    report["failures"] = failures
    print(json.dumps(report, indent=1))
    return int(bool(failures))


if __name__ == "__main__":
    sys.exit(cli.run(main))
