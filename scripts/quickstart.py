#!/usr/bin/env python
"""The whole pipeline on a CPU: shapes data -> VQ-VAE -> STAR -> sampler head -> generation -> judge.

    python scripts/quickstart.py [--fresh] [--long] [--smoke] [--minutes 20] [--precision auto|fp32|bf16]
                                 [--out outputs/quickstart] [--setup-seconds S]

Every stage runs the real entry script with the config in configs/; a stage whose result exists is reused
(and a half-finished training run resumes), --fresh starts over. Writes OUT/summary.json and prints a summary.
scripts/quickstart.sh sets up the environment first and then runs this.

The default run fits a time budget (--minutes, 20): each training stage gets a share of the time left
(loop.time_budget_s: the loop sets its step count from the speed of its first steps), so a faster machine
trains longer; the step counts used are in summary.json ("steps"). --minutes 0 uses fixed step counts
(STEPS["default"]), the same on every machine. --precision auto trains under bf16 autocast on CPUs with AMX (bf16
matrix units; ~1.5x faster there) and in fp32 elsewhere (bf16 is far slower than fp32 without AMX).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing

from utils.hardware import cpu_has_amx  # noqa: E402

TARGETS = {"one": 0.90, "two": 0.60}  # all-correct accuracy on held-out prompts

# Steps per stage: default (--minutes 0: fixed counts that fit 20 minutes on the slowest 2-core machine seen),
# --long, --smoke (CI: seconds per stage). With a time budget the --long counts are the upper bounds.
STEPS = {
    "default": {"data": 20000, "vqvae": 500, "star": 550, "sampler": 150, "eval": 200},
    "long": {"data": 20000, "vqvae": 2000, "star": 6000, "sampler": 600, "eval": 400},
    "smoke": {"data": 64, "vqvae": 2, "star": 2, "sampler": 2, "eval": 4},
}
# Shares of the training time under a budget, and seconds kept back for what is not a training loop: each
# training process's start-up and export (~10 s) and the step in progress when its budget runs out (the loop ends
# there even if it planned more: a 2-core AVX2 machine slowed down by 10% after the plan), the VQ-VAE evaluation,
# generation and judging.
# (The head gets little: on the shapes models it has not improved all-correct accuracy, docs/quickstart_experiments.md.)
BUDGET_SHARES = {"vqvae": 0.30, "star": 0.66, "sampler": 0.04}
STARTUP_SECONDS = 25
EVAL_SECONDS = {"vqvae_eval": 15, "generate_and_judge": 60}
# Generation and judging take ~6x as long as the VQ-VAE evaluation (55 s and 8.9 s on a 2-core AVX2 machine): once
# that has run, its time scales the allowance, so that a machine slower than usual keeps back more.
GENERATE_PER_VQVAE_EVAL = 6.5


def stage_budget(key: str, minutes: float, seconds: dict[str, float]) -> float:
    """loop.time_budget_s of training stage ``key``: its share of the time still left once the stages that follow
    have their allowance. ``seconds``: what the stages so far took (set-up included)."""
    later = list(BUDGET_SHARES)[list(BUDGET_SHARES).index(key):]
    allowance = dict(EVAL_SECONDS)
    if "vqvae_eval" in seconds:
        allowance["generate_and_judge"] = max(allowance["generate_and_judge"],
                                              GENERATE_PER_VQVAE_EVAL * seconds["vqvae_eval"])
    left = minutes * 60 - sum(seconds.values()) - sum(allowance[k] for k in allowance if k not in seconds)
    share = BUDGET_SHARES[key] / sum(BUDGET_SHARES[k] for k in later)
    return max(left - STARTUP_SECONDS * len(later), 0.0) * share


def run(cmd: list[str], log: Path) -> None:
    print(f"[quickstart] $ {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # the stage got the Ctrl-C too (one process group); a training stage checkpoints
            print("[quickstart] Ctrl-C: the stage finishes its step and writes a checkpoint (Ctrl-C again: abort)",
                  flush=True)
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.wait()
            raise SystemExit("[quickstart] interrupted; run the same command again to resume") from None
    if returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"[quickstart] failed (exit {returncode}): {' '.join(cmd)}\n--- {log} (end) ---\n{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    p.add_argument("--fresh", action="store_true", help="delete OUT and start over")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--long", action="store_true", help="train longer for better numbers")
    mode.add_argument("--smoke", action="store_true", help="a few steps per stage (CI)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of the default run (default 20; 0: fixed step counts)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training precision (loop.precision); auto: bf16 on CPUs with AMX, else fp32")
    p.add_argument("--setup-seconds", type=float, default=None,
                   help="time already spent setting up the environment (scripts/quickstart.sh passes it): "
                        "counted in the budget and in summary.json")
    args = p.parse_args(argv)
    if args.minutes is not None and (args.long or args.smoke):
        p.error("--minutes sets the default run's budget; --long and --smoke use fixed step counts")
    minutes = 20.0 if args.minutes is None and not (args.long or args.smoke) else (args.minutes or 0.0)
    precision = args.precision if args.precision != "auto" else "bf16" if cpu_has_amx() else "fp32"
    out = args.out if args.out.is_absolute() else REPO / args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    name = "smoke" if args.smoke else "long" if args.long else "default"
    steps = STEPS[name]
    py = sys.executable
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for key, value in (("mode", name), ("precision", precision), ("budget_minutes", minutes)):
        if summary.get(key) not in (None, value):
            raise SystemExit(f"[quickstart] {out} holds a {key}={summary[key]} run; use --fresh (or another --out)")
    summary["mode"], summary["precision"], summary["budget_minutes"] = name, precision, minutes
    seconds = summary.setdefault("stage_seconds", {})
    if args.setup_seconds is not None:  # the set-up of the invocation that started OUT (a re-run resumes its clock)
        seconds.setdefault("setup", round(args.setup_seconds, 1))
    used_steps = summary.setdefault("steps", {})
    log = out / "quickstart.log"
    data_dir, text_cache = out / "data", out / "text_cache"
    train_args = [f"--loop.precision={precision}"]
    if args.smoke:
        train_args += ["--loop.batch_size=8", "--loop.ckpt_every=1000", "--loop.log_every=1"]
    common = ["--data.source=lmdb", f"--data.lmdb_dirs=[\"{data_dir}\"]"]

    def stage(key: str, done_marker: Path, cmd: list[str]) -> None:
        if done_marker.exists():
            print(f"[quickstart] {key}: reusing {done_marker.relative_to(out)}")
            return
        start = time.perf_counter()
        run(cmd, log)
        seconds[key] = round(time.perf_counter() - start, 1)
        summary_path.write_text(json.dumps(summary, indent=2))

    def training_steps(key: str) -> list[str]:
        """--loop.steps (and, under a budget, --loop.time_budget_s) for training stage ``key``."""
        if not minutes:
            return [f"--loop.steps={steps[key]}"]
        return [f"--loop.steps={STEPS['long'][key]}", f"--loop.time_budget_s={stage_budget(key, minutes, seconds):.0f}"]

    def record_steps(key: str) -> None:
        used_steps[key] = json.loads((out / key / "config.json").read_text())["loop"]["steps"]

    ref = Path(os.environ.get("STAR_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
    if ref.is_dir():  # parity with the official implementation (the golden tensors), before any training
        stage("parity", out / "parity.json", [py, "scripts/check_parity.py", "--reference-dir", str(ref),
                                              "--part", "all", "--out", str(out / "parity.json")])
    else:
        print(f"[quickstart] no reference data at {ref}: parity check skipped")
    stage("data", data_dir / "DONE", [py, "test_pack.py", "--shapes", str(steps["data"]), "--out", str(data_dir)])
    (data_dir / "DONE").touch()
    stage("vqvae", out / "vqvae" / "final" / "config.json",
          [py, "train.py", "--config=configs/shapes_vqvae.json", f"--loop.out_dir={out / 'vqvae'}",
           *training_steps("vqvae"), *common, *train_args])
    record_steps("vqvae")
    stage("vqvae_eval", out / "vqvae_eval.json",
          [py, "scripts/eval_vqvae.py", "--vqvae", str(out / "vqvae" / "final"), "--count", str(steps["eval"]),
           "--out", str(out / "vqvae_eval.json")])
    stage("star", out / "star" / "final" / "config.json",
          [py, "train.py", "--config=configs/shapes_star.json", f"--loop.out_dir={out / 'star'}",
           *training_steps("star"), f"--star_train.vqvae={out / 'vqvae' / 'final'}",
           f"--text.cache_dir={text_cache}", *common, *train_args])
    record_steps("star")
    stage("sampler", out / "sampler" / "final" / "config.json",
          [py, "train_sampler.py", "--config=configs/shapes_sampler.json", f"--loop.out_dir={out / 'sampler'}",
           *training_steps("sampler"), f"--sampler_train.backbone={out / 'star' / 'final'}",
           f"--text.cache_dir={text_cache}", *common, *train_args])
    record_steps("sampler")
    pipeline = out / "pipeline"
    if not (pipeline / "config.json").is_file():
        shutil.copytree(out / "sampler" / "final", pipeline, dirs_exist_ok=True)
    stage("generate_and_judge", out / "judge" / "judge.json",
          [py, "scripts/eval_shapes.py", "--ckpt", str(pipeline), "--count", str(steps["eval"]),
           "--compare-sampler", "--out", str(out / "judge")])

    judge = json.loads((out / "judge" / "judge.json").read_text())
    vq = json.loads((out / "vqvae_eval.json").read_text())
    shutil.copyfile(out / "judge" / "examples_with_sampler.png", out / "samples_grid.png")
    for run_name in ("star", "vqvae", "sampler"):
        curve = out / run_name / "loss_curve.png"
        if curve.is_file():
            shutil.copyfile(curve, out / f"loss_curve_{run_name}.png")
    summary["total_seconds"] = round(sum(seconds.values()), 1)
    summary["judge"] = {r: judge[r]["summary"] for r in ("with_sampler", "without_sampler")}
    summary["sampling"] = judge["sampling"]  # the pipeline's defaults (configs/shapes_*.json star_train.sample_*)
    summary["vqvae_reconstruction"] = {"psnr_db": vq["psnr_db"], "judge": vq["judge_on_reconstructions"]}
    with_sampler = summary["judge"]["with_sampler"]
    summary["targets"] = {kind: {"all_correct": with_sampler.get(kind, {}).get("all_correct"), "target": t,
                                 "met": (with_sampler.get(kind, {}).get("all_correct") or 0) >= t}
                          for kind, t in TARGETS.items()}
    if name == "default":  # the 20-minute target is the default run's; --long and --smoke only report their time
        summary["targets"]["time"] = {"seconds": summary["total_seconds"], "target": 1200,
                                      "met": summary["total_seconds"] <= 1200}
    summary["files"] = {"pipeline": str(pipeline), "samples_grid": str(out / "samples_grid.png"),
                        "judge": str(out / "judge" / "judge.json"), "tensorboard": [str(out / r / "tb") for r in
                                                                                   ("vqvae", "star", "sampler")]}
    summary_path.write_text(json.dumps(summary, indent=2))

    from metrics.shapes_judge import format_table
    print(f"\n[quickstart] summary ({name}, {precision}" + (f", budget {minutes:g} min" if minutes else "") + ")")
    print(f"  training steps: {used_steps}")
    for key, sec in seconds.items():
        print(f"  {key:<20} {sec:8.1f} s")
    print(f"  {'total':<20} {summary['total_seconds']:8.1f} s")
    print(f"  VQ-VAE reconstruction PSNR {vq['psnr_db']:.2f} dB")
    print(f"  sampling: {summary['sampling']}")
    for run_name in ("with_sampler", "without_sampler"):
        print(f"  judge, {run_name}:\n" + format_table(summary["judge"][run_name]))
    for key, t in summary["targets"].items():
        print(f"  target {key}: {'met' if t['met'] else 'NOT MET'} ({t})")
    print(f"  files: {out} (summary.json, samples_grid.png, pipeline/ for sample.py and demo_gradio.py)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
