"""The training loop: loss goes down, exact resume, kill during checkpoint, DDP equivalence, VQ-VAE stage."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train_helpers import REPO, final_state, history, make_vqvae_dir, run_train, star_overrides, vqvae_overrides


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory):
    return make_vqvae_dir(tmp_path_factory.mktemp("vq") / "vqvae")


def _equal_states(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_kill_is_bit_identical(tmp_path, vqvae_dir, workers):
    steps = 8
    full = run_train(star_overrides(tmp_path / "full", vqvae_dir, steps, **{"data.workers": workers,
                                                                            "loop.ckpt_every": 4}))
    assert full.returncode == 0, full.stderr[-3000:]
    # Second run: SIGKILL right after the step-4 checkpoint appears, then resume with the same command.
    import os
    import subprocess
    import sys
    args = star_overrides(tmp_path / "cut", vqvae_dir, steps, **{"data.workers": workers, "loop.ckpt_every": 4})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py")] + args, env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "ckpt-00000004.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "cut" / "final").exists(), "the run was not cut mid-way"
    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step 4" in resumed.stderr
    assert _equal_states(final_state(tmp_path / "full"), final_state(tmp_path / "cut"))


def test_sigkill_during_checkpoint_write_resumes_from_previous(tmp_path, vqvae_dir):
    args = star_overrides(tmp_path / "run", vqvae_dir, 9)
    killed = run_train(args, script="tests/kill_during_checkpoint.py")
    assert killed.returncode == -signal.SIGKILL
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "ckpt-00000003.pt" in files and "ckpt-00000006.pt" not in files  # the half-written one never landed
    assert [f for f in files if f.startswith(".ckpt-00000006.pt.")]  # its temporary file stays behind
    # Also a corrupt checkpoint under the real name is skipped with a warning.
    (tmp_path / "run" / "ckpt-00000007.pt").write_bytes(b"truncated")
    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping unreadable checkpoint" in resumed.stderr and "step 3" in resumed.stderr
    assert not list((tmp_path / "run").glob(".ckpt-*.tmp"))  # and the resumed run removed it
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    # Steps 4-6 were logged before the kill and again after the resume: the history keeps each step once.
    assert [row["step"] for row in history(tmp_path / "run")] == list(range(1, 10))


def test_ddp_two_ranks_match_single_process(tmp_path, vqvae_dir):
    common = {"model.drop_path_rate": 0.0, "loop.ckpt_every": 100, "data.caption_dropout": 0.0,
              "loop.eval_every": 2, "loop.eval_samples": 6}
    single = run_train(star_overrides(tmp_path / "one", vqvae_dir, 4, **common))
    assert single.returncode == 0, single.stderr[-3000:]
    # The DDP run also recomputes its blocks in the backward pass (activation checkpointing, exact on its own:
    # tests/test_activation_checkpointing.py), so DDP's gradient hooks are checked against the recomputation too.
    ddp = run_train(star_overrides(tmp_path / "two", vqvae_dir, 4, **common,
                                   **{"star_train.activation_checkpointing": "true"}), torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
    # Validation splits the 6 held-out samples over the ranks and averages over all of them.
    val_one, val_two = ({r["step"]: r["val_loss"] for r in history(tmp_path / d) if "val_loss" in r}
                        for d in ("one", "two"))
    assert sorted(val_one) == sorted(val_two) == [2, 4]
    assert all(abs(val_one[s] - val_two[s]) < 1e-5 * val_one[s] for s in (2, 4)), (val_one, val_two)
    # the two ranks' weights were identical: rank 0 saved; check rank 1 agreed via the saved all-gathered RNG
    ckpt = torch.load(tmp_path / "two" / "ckpt-00000004.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2


def test_star_loss_decreases_and_logs(tmp_path, vqvae_dir):
    extra = {"loop.ckpt_every": 100, "loop.log_every": 5, "loop.sample_every": 30,
             "star_train.sample_prompts": '["a red circle at the top left"]', "star_train.sample_cfg": 1.5,
             "star_train.sample_top_k": 2, "star_train.sample_guidance": "constant"}
    # A run killed before its first checkpoint left rows behind (one torn): the new run starts the history over.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text('{"step": 5, "loss": 9.0}\n{"step": 10, "lo')
    res = run_train(star_overrides(tmp_path / "run", vqvae_dir, 30, **extra))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = history(tmp_path / "run")
    assert [row["step"] for row in rows] == list(range(5, 31, 5))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert {"acc", "loss_scale2", "acc_scale0", "images_per_s", "tokens_per_s", "tflops_per_s_per_rank", "grad_norm",
            "lr"} <= set(rows[-1])
    for f in ("loss_curve.png", "config.json", "samples/step_00000030.png", "final/config.json"):
        assert (tmp_path / "run" / f).is_file(), f
    assert list((tmp_path / "run" / "tb").iterdir())
    # the exported pipeline samples, by default, the way the run's samples were drawn
    exported = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert exported["generation"] == {"cfg": 1.5, "top_k": 2, "top_p": 0.95, "guidance_schedule": "constant"}
    # train.log says what the run was (it used to hold only the checkpoint lines), and the step lines, which the
    # console leaves to tqdm's bar
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert "star stage: " in lines[0] and "M trained), fp32 on cpu, 1 rank(s); writing to " in lines[0]
    assert lines[1].endswith("200 training records; batch 8 = 8 per rank x 1 rank(s) x 1 accumulation step(s); "
                             "30 steps")
    steps = [line.split("] ", 1)[1] for line in lines if "] step " in line]
    assert [s.split()[1] for s in steps] == [f"{n}/30" for n in range(5, 31, 5)]
    assert f"loss {rows[-1]['loss']:.4g} lr " in steps[-1] and "scale" not in steps[-1]
    assert "step 5/30" not in res.stderr
    assert "finished at step 30: 30 steps in " in lines[-1] and lines[-1].endswith("final (EMA weights)")


def test_vqvae_stage_trains_and_resumes(tmp_path):
    base = vqvae_overrides(**{"optim.lr": 2e-3, "vqvae_train.disc_weight": 0.1, "vqvae_train.disc_start": 4,
                              "optim.weight_decay": 0, "loop.log_every": 2, "vqvae_train.restart_dead_every": 4,
                              "loop.keep_last": 3})
    full = run_train(base + [f"--loop.out_dir={tmp_path / 'a'}", "--loop.steps=16", "--loop.ckpt_every=8",
                             "--loop.sample_every=16"])
    assert full.returncode == 0, full.stderr[-3000:]
    rows = history(tmp_path / "a")
    assert rows[-1]["recon"] < rows[0]["recon"] and "usage_scale2" in rows[-1] and "psnr" in rows[-1]
    assert "gan_d" in rows[-1] and "gan_d" not in rows[0]  # the discriminator starts at step 4
    assert (tmp_path / "a" / "samples" / "recon_00000016.png").is_file()
    # resume: a run stopped at step 8 (as if killed) and continued gives the same weights (discriminator and
    # its optimizer included)
    import shutil
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt-00000008.pt", tmp_path / "b" / "ckpt-00000008.pt")
    cont = run_train(base + [f"--loop.out_dir={tmp_path / 'b'}", "--loop.steps=16", "--loop.ckpt_every=8",
                             "--loop.sample_every=16"])
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert _equal_states(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


def test_vqvae_ddp_two_ranks_match_single_process(tmp_path):
    # 3 scales use 3 of the 4 phi convs: the unused one must not stall DDP's gradient reduction. The discriminator
    # is outside DDP: the test also checks its hand-made all-reduce (through the generator's adversarial loss).
    base = vqvae_overrides(**{"loop.steps": 3, "loop.ckpt_every": 100,
                              "vqvae_train.restart_dead_every": 0,  # restarts draw from rank 0's latents
                              "vqvae_train.disc_weight": 0.1, "vqvae_train.disc_start": 1})
    single = run_train(base + [f"--loop.out_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_train(base + [f"--loop.out_dir={tmp_path / 'two'}"], torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_resume_with_another_batch_size_keeps_the_sample_position(tmp_path, vqvae_dir):
    first = run_train(star_overrides(tmp_path, vqvae_dir, 2, **{"loop.ckpt_every": 2}))  # batch 8: 2 batches in
    assert first.returncode == 0, first.stderr[-3000:]
    assert "optim.warmup_steps=2 >= loop.steps=2: the learning rate never reaches optim.lr=0.003" in first.stderr
    second = run_train(star_overrides(tmp_path, vqvae_dir, 4, **{"loop.batch_size": 4}))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 samples per micro-batch over all ranks, the checkpoint's 8" in second.stderr
    assert "at step 2 (epoch 0, batch 4)" in second.stderr
    # the same global batch in two micro-batches: the position in micro-batches doubles too
    third = run_train(star_overrides(tmp_path, vqvae_dir, 6, **{"loop.batch_size": 4, "optim.grad_accum": 2}))
    assert third.returncode == 0, third.stderr[-3000:]
    assert "at step 4 (epoch 0, batch 12)" in third.stderr  # 2 x 8 + 2 x 4 = 24 samples in


def test_config_errors_are_reported(tmp_path):
    res = run_train(["--stage=star", "--loop.stpes=3"])
    assert res.returncode == 2 and "Did you mean 'steps'" in res.stderr
    res = run_train([])
    assert res.returncode == 2 and "no config given: pass --config=" in res.stderr


def test_perceptual_loss_from_local_files(tmp_path):
    """Random stand-in weight files of the right layout: zero for identical images, positive and
    differentiable otherwise; the VQ-VAE stage adds it when configured."""
    from torchvision.models import vgg16

    from trainer.perceptual import PerceptualLoss
    torch.manual_seed(0)
    torch.save(vgg16().state_dict(), tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / "lin.pth")
    loss = PerceptualLoss(tmp_path / "vgg16.pth", tmp_path / "lin.pth")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert loss(x, x).item() == 0.0
    d = loss(x, y)
    d.backward()
    assert d.item() > 0 and y.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="perceptual loss weights not found"):
        PerceptualLoss(tmp_path / "missing.pth", tmp_path / "lin.pth")


def test_dead_code_restart_reseeds_only_codes_unused_in_the_window():
    """Codes hit in the window keep their vectors; the rest move onto residual vectors the quantizer sees, and
    a restarted code that then stays unused is restarted again at the next check (no grace period)."""
    from trainer.config import RunConfig
    from trainer.vqvae_stage import VQVAEStage
    from utils.config import load_config
    cfg = load_config(RunConfig, None, ["--stage=vqvae", "--vqvae.vocab_size=16", "--vqvae.z_channels=4",
                                        "--vqvae.ch=32", "--vqvae.ch_mult=[1,2]", "--vqvae.patch_nums=[1,2,4]",
                                        "--vqvae_train.restart_dead_every=2"])
    torch.manual_seed(0)
    stage = VQVAEStage(cfg, torch.device("cpu"))
    q = stage.model.quantize
    stage._latents = torch.randn(2, 4, 4, 4)
    pool = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, 4) for z in q.residual_inputs(stage._latents)])
    before = q.embedding.weight.detach().clone()
    stage._window_hits[:8] = 50.0                       # codes 0..7 used, 8..15 dead
    stage.after_step(1, {})                              # not a check step: nothing happens
    assert torch.equal(q.embedding.weight, before)
    metrics = {}
    stage.after_step(2, metrics)
    assert metrics["restarted_codes"] == 8
    assert torch.equal(q.embedding.weight[:8], before[:8])
    moved = q.embedding.weight[8:].detach()
    nearest = torch.cdist(moved, pool).min(1).values
    assert (nearest < 0.05 * pool.std()).all()          # each restarted code sits on a pool vector (+ jitter)
    assert stage._window_hits.sum() == 0                 # a new window starts
    stage._window_hits[:8] = 50.0                        # the restarted codes stay unused
    metrics = {}
    stage.after_step(4, metrics)
    assert metrics["restarted_codes"] == 8


def test_vqvae_stage_metrics_equal_a_direct_computation_and_read_the_device_once():
    """recon, vq and PSNR against the model's own outputs and the PSNR formula; per-scale codebook usage as its
    definition; no per-metric host reads (.item() made one host-device sync per metric on a GPU)."""
    import math

    import torch.nn.functional as F

    from tests.helpers import HostReads
    from trainer.config import RunConfig
    from trainer.vqvae_stage import VQVAEStage
    from utils.config import load_config
    cfg = load_config(RunConfig, None, vqvae_overrides(**{"vqvae_train.recon": "l1"}))
    torch.manual_seed(0)
    stage = VQVAEStage(cfg, torch.device("cpu"))
    img = torch.rand(4, 3, 8, 8) * 2 - 1
    with HostReads() as reads:
        loss, metrics = stage.loss(stage.model, {"image": img})
        val = stage.evaluate(stage.model, {"image": img})
    assert reads.ops == []
    with torch.no_grad():
        rec, vq, _, _ = stage.model(img)
    mse_01 = ((rec.clamp(-1, 1) - img) / 2).pow(2).mean().item()
    for m in (metrics, val):
        assert math.isclose(m["recon"], F.l1_loss(rec, img).item(), rel_tol=1e-5)  # vqvae_train.recon=l1
        assert math.isclose(m["vq"], vq.item(), rel_tol=1e-5)
        assert math.isclose(m["psnr"], -10 * math.log10(mse_01), rel_tol=1e-5)
    assert math.isclose(val["loss"], val["recon"] + cfg.vqvae_train.vq_weight * val["vq"], rel_tol=1e-6)
    usage = (stage.model.quantize.ema_vocab_hit_SV > cfg.vqvae_train.dead_threshold).float().mean(1)
    assert [metrics[f"usage_scale{s}"] for s in range(3)] == usage.tolist()


def test_loss_curve_draws_training_and_validation_without_pyplot(tmp_path):
    """The plot must not touch matplotlib's global state (backend, pyplot's figure registry): train() may run
    inside a notebook or a GUI program."""
    from PIL import Image
    rows = [{"step": s, "loss": 1 / s, "acc": s / 10, **({"val_loss": 2 / s, "val_acc": s / 20} if s % 3 == 0 else {})}
            for s in range(1, 11)]
    (tmp_path / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = ("import sys; from pathlib import Path; from trainer.loop import plot_loss_curve; "
            f"plot_loss_curve(Path({str(tmp_path / 'log.txt')!r}), Path({str(tmp_path / 'curve.png')!r})); "
            "print('matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert Image.open(tmp_path / "curve.png").size == (1000, 350)  # two panels: loss, and accuracy


def test_steps_within_budget():
    from trainer.loop import steps_within_budget
    # 20 steps in 10 s, 0.5 s/step, 60 s budget: 50 s left = 100 more steps
    assert steps_within_budget(60.0, 10.0, 20, 0.5, upper=1000) == 120
    assert steps_within_budget(60.0, 10.0, 20, 0.5, upper=50) == 50      # capped by loop.steps
    assert steps_within_budget(5.0, 10.0, 20, 0.5, upper=1000) == 20     # already over: stop now


def test_time_budget_fixes_the_step_count_and_resume_keeps_it(tmp_path, vqvae_dir):
    extra = {"loop.time_budget_s": 16, "loop.ckpt_every": 10, "loop.keep_last": 1000, "loop.log_every": 10,
             "optim.warmup_steps": 20}
    res = run_train(star_overrides(tmp_path / "a", vqvae_dir, 100000, **extra))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "time budget 16 s" in res.stderr and "first plan" in res.stderr
    revised = int(re.search(r"-> (\d+) steps \(at most 100000; final\)", res.stderr)[1])
    # the run ends at that count (or earlier, should the machine slow down enough to spend the budget first)
    steps = json.loads((tmp_path / "a" / "config.json").read_text())["loop"]["steps"]
    assert 40 <= steps <= revised < 100000
    ckpts = sorted((tmp_path / "a").glob("ckpt-*.pt"))
    assert ckpts[-1].name == f"ckpt-{steps:08d}.pt" and json.loads(
        torch.load(ckpts[-1], weights_only=True)["config"])["loop"]["steps"] == steps
    # the plan after step 20 is revised at the next checkpoint (step 30); checkpoints from then on hold the count
    stored = {int(c.stem.split("-")[1]): torch.load(c, weights_only=True)["budget_steps"] for c in ckpts}
    assert stored[10] is None and stored[20] is None and stored[30] == stored[40] == revised
    # resumed from a checkpoint with the final count, the run keeps that count and the same schedule, whatever
    # the budget says now: its weights are those of the uninterrupted run
    (tmp_path / "b").mkdir()
    import shutil
    shutil.copy(tmp_path / "a" / "ckpt-00000030.pt", tmp_path / "b")
    extra["loop.time_budget_s"] = 0.5
    resumed = run_train(star_overrides(tmp_path / "b", vqvae_dir, 100000, **extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 30" in resumed.stderr and "time budget" not in resumed.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["loop"]["steps"] == revised
    at_40 = [torch.load(d / "ckpt-00000040.pt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b")]
    assert _equal_states(at_40[0]["model"], at_40[1]["model"]) and _equal_states(at_40[0]["ema"], at_40[1]["ema"])
    if steps == revised:  # not cut short: the exported weights too
        assert _equal_states(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


def test_time_budget_ends_the_run_when_later_steps_run_slower_than_planned(tmp_path, vqvae_dir):
    # Validation every 25 steps (512 samples: longer than the 25 steps between) costs time that the plan after step
    # 20 did not see: without the deadline the run would overrun its budget by several seconds.
    extra = {"loop.time_budget_s": 12, "loop.ckpt_every": 1000, "loop.log_every": 10, "optim.warmup_steps": 20,
             "loop.eval_every": 25, "loop.eval_samples": 512}
    res = run_train(star_overrides(tmp_path, vqvae_dir, 100000, **extra))
    assert res.returncode == 0, res.stderr[-3000:]
    planned = int(re.search(r"-> (\d+) steps \(at most 100000; first plan\)", res.stderr)[1])
    ended = re.search(r"time budget 12 s spent at step (\d+) of (\d+): ending here", res.stderr)
    assert ended is not None, res.stderr[-3000:]
    step = int(ended[1])
    assert 20 < step < planned == int(ended[2])
    assert json.loads((tmp_path / "config.json").read_text())["loop"]["steps"] == step
    ckpt = torch.load(tmp_path / f"ckpt-{step:08d}.pt", weights_only=True)
    assert ckpt["budget_steps"] == step  # a resume keeps the shortened count
    assert history(tmp_path)[-1]["step"] == step and "val_loss" in history(tmp_path)[-1]
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_half_precision_on_a_cpu_without_amx_is_warned_about(monkeypatch):
    """bf16 / fp16 autocast on an AVX2 CPU runs its matmuls ~100x slower than fp32: a run should say so."""
    import trainer.loop as loop
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loop, "cpu_has_amx", lambda: False)
    assert "loop.precision=bf16 on a CPU without AMX" in loop.precision_warning(cpu, "bf16")
    assert loop.precision_warning(cpu, "fp16") is not None
    assert loop.precision_warning(cpu, "fp32") is None and loop.precision_warning(cuda, "bf16") is None
    monkeypatch.setattr(loop, "cpu_has_amx", lambda: True)
    assert loop.precision_warning(cpu, "bf16") is None


def test_warnings_from_building_the_stage_reach_train_log(tmp_path, vqvae_dir):
    """The stage is built before the loop starts; its warnings (here: fine-tuning from a run with another text
    encoder) went to the console only, not into the run's train.log."""
    from trainer.config import RunConfig
    from trainer.star_stage import StarStage
    from utils.config import load_config
    source = load_config(RunConfig, None, star_overrides(tmp_path / "source", vqvae_dir, **{"text.tiny_layers": 1}))
    StarStage(source, torch.device("cpu")).export(tmp_path / "source" / "final", None)
    res = run_train(star_overrides(tmp_path / "run", vqvae_dir, 1, **{"loop.init_from": tmp_path / "source" / "final",
                                                                      "text.tiny_layers": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "was trained with text.tiny_layers=1, this run uses 2" in (tmp_path / "run" / "train.log").read_text()
