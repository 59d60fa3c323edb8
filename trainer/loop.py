"""The one training loop shared by every stage (VQ-VAE, STAR transformer, sampler head).

A stage supplies the trained module and ``loss(batch) -> (loss, metrics)``; the loop does the rest:
DDP (gradients synchronised on the last micro-step only), AMP (fp16 + GradScaler, bf16), accumulation,
clipping, LR schedule, an optional time budget, EMA, exact resume (model, EMA, optimizer, scaler, step, data
position, per-rank RNG), atomic checkpoints with keep-last-N, non-finite loss handling, logging (console/tqdm,
JSON lines, TensorBoard, loss-curve PNG) and periodic samples.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import time
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.checkpoint import atomic_save, mismatch_reason
from trainer.config import RunConfig
from trainer.optim import EMA, build_optimizer, lr_factor
from trainer.state import (
    checkpoint_path,
    find_resumable,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.stop import StopRequest, TrainingStopped
from utils import dist
from utils.config import ConfigError, config_changes, to_dict
from utils.data.dataset import DistributedResumableSampler
from utils.hardware import cpu_has_amx
from utils.logging import FILE_ONLY, get_logger


class Stage(Protocol):
    model: nn.Module                     # the trained module (wrapped in DDP by the loop)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, float]: ...  # validation means, no side effects

    def after_step(self, step: int, metrics: dict) -> None: ...

    def sample(self, step: int, out_dir: Path, writer) -> None: ...

    def export(self, out_dir: Path, ema_state: dict | None) -> None: ...


class NonFiniteLossError(RuntimeError):
    pass


def host_values(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """A stage's 0-d metric tensors as floats, read in one device-to-host transfer: on a GPU one sync per step
    instead of one per metric, each of which stalled the queueing of the backward pass."""
    return dict(zip(values, torch.stack([v.detach().float() for v in values.values()]).tolist()))


# loop.time_budget_s: the mean duration of steps first..last sets the step count (the first steps, which pay for
# data-loader start-up and first-touch allocations, are left out). Until then the LR schedule is that of the
# upper bound loop.steps; a warm-up of >= last steps (the shipped configs) makes that irrelevant. The first
# checkpoint after that revises the count once with the mean speed since step ``first`` (which then includes a
# checkpoint, periodic samples and any drift: on a 2-core CPU the first steps ran 4-20% faster than the mean);
# from then on the count is final and stored in every checkpoint.
BUDGET_TIMED_STEPS = (5, 20)


def steps_within_budget(budget_s: float, elapsed_s: float, step: int, seconds_per_step: float, upper: int) -> int:
    """Total optimizer steps such that a run that has taken ``elapsed_s`` for ``step`` steps ends within
    ``budget_s`` at ``seconds_per_step``; never fewer than ``step``, never more than ``upper``."""
    remaining = max(budget_s - elapsed_s, 0.0)
    return max(step, min(upper, step + int(remaining / seconds_per_step)))


def micro_batch_samples(config: dict) -> int:
    """Samples per micro-batch over all ranks of a resolved config (as stored in checkpoints)."""
    return config["loop"]["batch_size"] // config["optim"]["grad_accum"]


def precision_warning(device: torch.device, precision: str) -> str | None:
    """What to tell a run whose autocast dtype is slow on its device (half precision on a CPU without AMX)."""
    if device.type == "cpu" and precision != "fp32" and not cpu_has_amx():
        return (f"loop.precision={precision} on a CPU without AMX: half-precision matmuls run ~100x slower than "
                "fp32 here; --loop.precision=fp32 is the fast setting on this machine")
    return None


def run_header(cfg: RunConfig, model: nn.Module, train_records: int, val_records: int, world: int,
               per_step: int, device: torch.device, budget_state: str) -> list[str]:
    """What train.log says a run is, before its first step: model size, data, batch, steps, precision, place."""
    loop, total = cfg.loop, sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget = ""
    if loop.time_budget_s > 0:  # a resumed run keeps the count its budget chose before the interruption
        budget = (" (kept from the checkpoint, as its budget planned)" if budget_state == "final"
                  else f" (at most: time budget {loop.time_budget_s:g} s)")
    validation = f", {val_records} validation records every {loop.eval_every} steps" if val_records else ""
    return [f"{cfg.stage} stage: {total / 1e6:.2f}M parameters ({trained / 1e6:.2f}M trained), {loop.precision} on "
            f"{device}, {world} rank(s); writing to {Path(loop.out_dir).resolve()}",
            f"{train_records} training records{validation}; batch {loop.batch_size} = {per_step} per rank x {world} "
            f"rank(s) x {cfg.optim.grad_accum} accumulation step(s); {loop.steps} steps{budget}"]


def step_line(row: dict, steps: int) -> str:
    """A log.txt row as one train.log line (the per-scale values stay in log.txt and TensorBoard)."""
    shown = [f"step {row['step']}/{steps}"] + [
        f"{k} {v:.4g}" for k, v in row.items()
        if k not in ("step", "epoch", "images_per_s", "tokens_per_s", "peak_rss_gb") and "scale" not in k
        and not k.startswith("val_")]
    return " ".join(shown) + f" ({row['images_per_s']:.1f} img/s)"


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def train(cfg: RunConfig, stage: Stage, dataset: Dataset, device: torch.device,
          val_dataset: Dataset | None = None) -> dict:
    """Run (or resume) training; returns the final metrics. ``dataset`` items are dicts with ``image``/``caption``.
    With ``loop.time_budget_s`` the chosen step count is written into ``cfg.loop.steps``. ``val_dataset``: the
    validation set of ``loop.eval_every``."""
    t_start = time.time()
    loop, optim_cfg = cfg.loop, cfg.optim
    out_dir = Path(loop.out_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    log = get_logger("star", out_dir / "train.log" if rank == 0 else None)
    per_step = loop.batch_size // (world * optim_cfg.grad_accum)
    if per_step * world * optim_cfg.grad_accum != loop.batch_size:
        raise ConfigError(f"loop.batch_size {loop.batch_size} must be divisible by world size {world} x "
                          f"grad_accum {optim_cfg.grad_accum}")

    if (warning := precision_warning(device, loop.precision)) is not None:
        log.warning(warning)
    model = stage.model.to(device)
    trained: nn.Module = model
    if loop.compile:
        trained = torch.compile(model)
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=device_ids, broadcast_buffers=False)
    optimizer = build_optimizer(model, optim_cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=loop.precision == "fp16", init_scale=2.0 ** 11)
    ema = EMA(model, optim_cfg.ema_decay) if optim_cfg.ema_decay > 0 else None

    # --- resume -----------------------------------------------------------------------------------------------
    step, epoch, batches_in_epoch = 0, 0, 0
    skipped_records = 0  # unreadable records the data set passed over, all ranks (data sets that report them)
    resumed = None
    if loop.resume == "auto":
        resumed = find_resumable(out_dir)
    elif loop.resume:
        resumed = (Path(loop.resume), load_checkpoint(loop.resume))
    if resumed is not None:
        path, ckpt = resumed
        saved_config = json.loads(ckpt["config"]) if ckpt.get("config") else None
        changes = config_changes(saved_config, to_dict(cfg)) if saved_config else []
        if saved_config and saved_config.get("stage") not in (None, cfg.stage):  # say that first, not 30 settings
            raise ConfigError(f"{path} is a checkpoint of a {saved_config['stage']!r} run, not {cfg.stage!r}: each run "
                              "needs its own --loop.out_dir")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:  # another architecture: say which settings changed, not which tensors are missing
            raise ConfigError(f"{path} does not fit this model ({mismatch_reason(e)}). Settings changed since it was "
                              f"written: {'; '.join(changes) or 'none'}. Resume with its settings, or train into "
                              "another --loop.out_dir") from None
        if changes:
            log.warning("resuming with settings changed since the checkpoint: %s", "; ".join(changes))
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        if hasattr(stage, "load_state_dict"):
            stage.load_state_dict(ckpt.get("stage", {}))
        step, epoch, batches_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batches_in_epoch"]
        skipped_records = ckpt.get("skipped_records", 0)
        if loop.time_budget_s > 0 and ckpt.get("budget_steps"):
            loop.steps = ckpt["budget_steps"]  # the final step count chosen before the interruption
        micro = micro_batch_samples(to_dict(cfg))
        saved_micro = micro_batch_samples(saved_config) if saved_config else micro
        if saved_micro != micro:  # the data position counts micro-batches: keep it in samples instead
            batches_in_epoch = batches_in_epoch * saved_micro // micro
            log.warning("%d samples per micro-batch over all ranks, the checkpoint's %d (loop.batch_size / "
                        "optim.grad_accum): resuming at the same sample of the epoch (batch %d); the run is not "
                        "identical to an uninterrupted one", micro, saved_micro, batches_in_epoch)
        saved_size = ckpt.get("dataset_size")
        if saved_size is not None and saved_size != len(dataset):  # shards added or removed under the same paths
            log.warning("the data set has %d records, the checkpoint's run had %d: the epoch order differs from "
                        "here on, so the run is not identical to an uninterrupted one", len(dataset), saved_size)
        rngs = ckpt["rng"]
        if len(rngs) != world:
            log.warning("checkpoint written by %d rank(s), resuming on %d: ranks without a saved RNG state take "
                        "rank 0's; the run is not identical to an uninterrupted one", len(rngs), world)
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, step, epoch, batches_in_epoch)
        if step >= loop.steps:
            log.info("the run is complete (loop.steps=%d): nothing to train, final/ is exported again; raise "
                     "--loop.steps to train further", loop.steps)
    else:
        torch.manual_seed(loop.seed + rank)
    history_path = out_dir / "log.txt"
    if rank == 0:  # rows after the starting step come from an interrupted run in this directory
        truncate_history(history_path, step)
        for stale in remove_stale_temporaries(out_dir):
            log.info("removed %s, left by a checkpoint write that was interrupted", stale.name)
    # With a time budget, loop.steps is the upper bound while "timing", the first plan while "planned", and the
    # count the run keeps (resume included) once "final" (BUDGET_TIMED_STEPS).
    budget_state = "final" if loop.time_budget_s <= 0 or (resumed is not None and resumed[1].get("budget_steps")) \
        else "timing"
    upper_steps = loop.steps
    # A run that plans its step count here also ends when its budget is spent, at the step in progress: a machine
    # that slows down after the plan must not overrun it (a quickstart stage ran 10% over). A count that is final
    # from a checkpoint is kept.
    deadline = t_start + loop.time_budget_s if budget_state != "final" else math.inf

    def write_config():
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    write_config()

    sampler = DistributedResumableSampler(len(dataset), rank, world, shuffle=True, seed=loop.seed)
    batches_per_epoch = len(sampler) // per_step
    if batches_per_epoch == 0:
        raise ConfigError(f"data set of {len(dataset)} items is smaller than one batch per rank ({per_step}): "
                          "lower loop.batch_size")

    def batches():
        """Infinite batches from (epoch, batches_in_epoch) on, in the same order whether or not we resumed."""
        nonlocal epoch, batches_in_epoch
        while True:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            sampler.set_epoch(epoch, start=batches_in_epoch * per_step)
            # A private generator: creating the loader must not consume the global RNG (exact resume).
            loader = DataLoader(dataset, batch_size=per_step, sampler=sampler, num_workers=cfg.data.workers,
                                drop_last=True, generator=torch.Generator().manual_seed(loop.seed + epoch),
                                persistent_workers=False, pin_memory=device.type == "cuda")
            for batch in loader:
                batches_in_epoch += 1
                yield batch
            epoch, batches_in_epoch = epoch + 1, 0

    val_loader, val_count = None, 0
    if val_dataset is not None and loop.eval_every:
        # The first eval_samples samples in order, split over the ranks (padded by wrapping, as the training sampler,
        # so that every rank has the same number).
        val_count = min(loop.eval_samples, len(val_dataset))
        val_loader = DataLoader(val_dataset, batch_size=per_step, num_workers=cfg.data.workers,
                                sampler=DistributedResumableSampler(val_count, rank, world, shuffle=False))
    for line in run_header(cfg, model, len(dataset), val_count, world, per_step, device, budget_state):
        log.info("%s", line)
    if optim_cfg.warmup_steps >= loop.steps and loop.time_budget_s <= 0:
        log.warning("optim.warmup_steps=%d >= loop.steps=%d: the learning rate never reaches optim.lr=%g",
                    optim_cfg.warmup_steps, loop.steps, optim_cfg.lr)
    first_step, t_first_step = step, time.time()

    def evaluate() -> dict[str, float]:
        """The stage's validation metrics, averaged over samples and ranks: eval mode, no gradients, a fixed RNG (the
        same random draws at every evaluation; the training RNG is untouched)."""
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                _autocast(device, loop.precision):
            torch.manual_seed(loop.seed)
            for batch in val_loader:
                n = len(batch["image"])
                for k, v in stage.evaluate(model, batch).items():
                    sums[k] = sums.get(k, 0.0) + v * n
                count += n
        model.train()
        keys = sorted(sums)
        totals = dist.reduce_over_ranks([sums[k] for k in keys] + [count], device)
        return {f"val_{k}": v / totals[-1] for k, v in zip(keys, totals[:-1])}

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        # TensorBoard drops the events an interrupted run wrote after the starting step.
        writer = SummaryWriter(str(out_dir / "tb"), purge_step=step + 1)

    def count_skipped_records() -> None:
        """Add every rank's records skipped since the last call to the total (all ranks call it at the same step)."""
        nonlocal skipped_records, skipped_pending
        counts = torch.tensor([skipped_pending], dtype=torch.float64, device=device)
        if world > 1:
            tdist.all_reduce(counts)
        skipped_records, skipped_pending = skipped_records + int(counts.item()), 0

    saved_step = step if resumed is not None else -1  # the step of the newest checkpoint on disk
    saved_at = time.time()  # when it was written (or this run started): loop.ckpt_every_minutes

    def checkpoint():
        nonlocal saved_step, saved_at
        if budget_state == "planned" and step > planned_at:  # the first checkpoint after the first plan
            plan_budget()
        if reports_skips:
            count_skipped_records()
        rngs = [None] * world
        if world > 1:
            tdist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if rank == 0:
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else None, "step": step,
                       "epoch": epoch, "batches_in_epoch": batches_in_epoch, "rng": rngs,
                       "skipped_records": skipped_records, "dataset_size": len(dataset),
                       "budget_steps": loop.steps if loop.time_budget_s > 0 and budget_state == "final" else None,
                       "config": json.dumps(to_dict(cfg)),
                       "stage": stage.state_dict() if hasattr(stage, "state_dict") else {}}
            path = save_checkpoint(out_dir, step, payload, loop.keep_last)
            log.info("saved %s", path)
        dist.barrier()
        saved_step, saved_at = step, time.time()

    def stop(signum: int) -> None:
        """A stop signal reached some rank: checkpoint this step (unless just done) and end the run on every rank."""
        if rank == 0:
            log.warning("%s received: stopping at step %d", signal.Signals(signum).name, step)
        if saved_step != step:
            checkpoint()
        bar.close()
        if writer is not None:
            writer.close()
        raise TrainingStopped(signum, step, str(checkpoint_path(out_dir, step)))

    def plan_budget() -> None:
        """Set loop.steps from the mean speed since the timing window opened (the slowest rank's, so that all
        ranks agree): the first plan, then its one revision."""
        nonlocal budget_state, planned_at
        seconds_per_step = (time.time() - timed_from[1]) / (step - timed_from[0])
        timing = torch.tensor([seconds_per_step, time.time() - t_start], dtype=torch.float64,
                              device=device if device.type == "cuda" else "cpu")
        if world > 1:
            tdist.all_reduce(timing, op=tdist.ReduceOp.MAX)
        loop.steps = steps_within_budget(loop.time_budget_s, timing[1].item(), step, timing[0].item(), upper_steps)
        if budget_state == "timing":
            budget_state, planned_at = "planned", step
        else:
            budget_state = "final"
        bar.total = loop.steps
        log.info("time budget %.0f s: %.3f s/step after %d steps (%.0f s elapsed) -> %d steps (at most %d; %s)",
                 loop.time_budget_s, timing[0].item(), step, timing[1].item(), loop.steps, upper_steps,
                 "first plan" if budget_state == "planned" else "final")
        write_config()

    data = batches()
    nonfinite_in_row, last = 0, {}
    reports_skips, skipped_pending = False, 0
    timed_from = None  # (step, time) where the budget's timing window opened
    planned_at = None  # step of the first plan
    t_window, images_window, tokens_window, flops_window = time.time(), 0, 0.0, 0.0
    bar = tqdm(total=loop.steps, initial=step, desc=cfg.stage, disable=rank != 0, dynamic_ncols=True)
    trained.train()
    with StopRequest() as stop_request:
        while step < loop.steps:
            lr = optim_cfg.lr * lr_factor(step, loop.steps, optim_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            metrics_sum: dict[str, float] = {}
            loss_value = 0.0
            for micro in range(optim_cfg.grad_accum):
                batch = next(data)
                sync = micro == optim_cfg.grad_accum - 1
                ctx = trained.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    with _autocast(device, loop.precision):
                        loss, metrics = stage.loss(trained, batch)
                    scaler.scale(loss / optim_cfg.grad_accum).backward()
                loss_value += loss.item() / optim_cfg.grad_accum
                tokens_window += metrics.pop("tokens", 0.0) * world  # stages that predict tokens report them
                flops_window += metrics.pop("flops", 0.0)  # this rank's model FLOPs (stages with a formula report them)
                for k, v in metrics.items():
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + v / optim_cfg.grad_accum
                images_window += len(batch["image"]) * world
                if "skipped" in batch:  # LMDB items say whether their record was unreadable (and the next one served)
                    reports_skips, skipped_pending = True, skipped_pending + int(batch["skipped"].sum())
            # Every rank skips the step if any rank's loss is non-finite (ranks that stepped alone would drift apart
            # and fall out of step with the others' collectives), and every rank stops after this step if any rank
            # got a stop signal, or if the time budget is spent. The same all-reduce decides a checkpoint by time (rank
            # clocks differ: the first rank due decides).
            now = time.time()
            ckpt_due = loop.ckpt_every_minutes > 0 and now - saved_at >= 60 * loop.ckpt_every_minutes
            nonfinite, stop_signum, ckpt_due, out_of_time = dist.reduce_over_ranks(
                [float(not math.isfinite(loss_value)), float(stop_request.signum), float(ckpt_due),
                 float(now >= deadline)], device, op="max")
            bad = "loss" if nonfinite else None
            if bad is None:
                scaler.unscale_(optimizer)
                params = [p for p in model.parameters() if p.requires_grad]
                max_norm = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                # A finite loss can still have non-finite gradients; AdamW would write them into every weight. (The
                # gradients are already averaged over ranks, so all ranks see the same norm. Under fp16 the
                # GradScaler skips such steps itself and lowers its scale: overflow there is routine.)
                if loop.precision != "fp16" and not torch.isfinite(grad_norm):
                    bad = "gradient"
            if bad is not None:
                optimizer.zero_grad(set_to_none=True)
                nonfinite_in_row += 1
                if loop.precision == "fp16":
                    scaler.update(scaler.get_scale() / 2)
                log.warning("non-finite %s at step %d (%d in a row); step skipped", bad, step, nonfinite_in_row)
                if nonfinite_in_row >= loop.max_nonfinite:
                    raise NonFiniteLossError(f"{nonfinite_in_row} non-finite losses or gradients in a row at step "
                                             f"{step}; the last good checkpoint in {out_dir} is kept. Lower the LR or "
                                             "use fp32/bf16.")
                if stop_signum:
                    stop(int(stop_signum))
                continue
            nonfinite_in_row = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1
            stage.after_step(step, metrics_sum)
            bar.update(1)
            if budget_state == "timing":
                first, last_timed = BUDGET_TIMED_STEPS
                if timed_from is None and step >= first:
                    timed_from = (step, time.time())
                elif timed_from is not None and step - timed_from[0] >= last_timed - first:
                    plan_budget()
            if out_of_time and step < loop.steps:
                log.warning("time budget %.0f s spent at step %d of %d: ending here", loop.time_budget_s, step,
                            loop.steps)
                loop.steps, budget_state, bar.total = step, "final", step
                write_config()

            evaluated = val_loader is not None and (step % loop.eval_every == 0 or step == loop.steps)
            val_metrics = {}
            if evaluated:
                t_eval = time.time()
                val_metrics = evaluate()
                t_window += time.time() - t_eval  # images/s and TFLOP/s count training time only
            if val_metrics and rank == 0:
                summary = sorted((k != "val_loss", k[4:], v) for k, v in val_metrics.items() if "_scale" not in k)
                log.info("step %d validation: %s", step, ", ".join(f"{name} {v:.4g}" for _, name, v in summary))
            if step % loop.log_every == 0 or step == loop.steps or evaluated:
                elapsed = time.time() - t_window
                last = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                        "images_per_s": images_window / max(elapsed, 1e-9), **metrics_sum,
                        **({"tokens_per_s": tokens_window / max(elapsed, 1e-9)} if tokens_window else {}),
                        **({"tflops_per_s_per_rank": flops_window / max(elapsed, 1e-9) / 1e12} if flops_window else {}),
                        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, **val_metrics}
                if reports_skips:
                    count_skipped_records()
                    last["skipped_records"] = skipped_records
                if device.type == "cuda":
                    last["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                t_window, images_window, tokens_window, flops_window = time.time(), 0, 0.0, 0.0
                if rank == 0:
                    with open(history_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    log.info("%s", step_line(last, loop.steps), extra=FILE_ONLY)
                    for k, v in last.items():
                        if k not in ("step", "epoch"):
                            writer.add_scalar(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}", v, step)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if loop.sample_every and step % loop.sample_every == 0 and rank == 0:
                stage.sample(step, out_dir, writer)
            if step % loop.ckpt_every == 0 or step == loop.steps or ckpt_due:
                checkpoint()
            if stop_signum and step < loop.steps:
                stop(int(stop_signum))
    bar.close()
    if rank == 0:
        stage.export(out_dir / "final", ema.state_dict() if ema else None)
        plot_loss_curve(history_path, out_dir / "loss_curve.png")
        writer.close()
        seconds, done = time.time() - t_first_step, step - first_step
        skipped = f"; {skipped_records} unreadable records skipped" if skipped_records else ""
        log.info("finished at step %d: %d steps in %.0f s%s; exported %s (%s weights)%s", step, done, seconds,
                 f" ({seconds / done:.3f} s/step)" if done else "", out_dir / "final", "EMA" if ema else "raw",
                 skipped)
    dist.barrier()
    return last


def read_history(history_path: Path) -> list[dict]:
    """The JSON-lines history's rows; a line torn by a kill is skipped."""
    rows = []
    for line in history_path.read_text().splitlines() if history_path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_history(history_path: Path, step: int) -> None:
    """Before (re)starting at ``step``: drop the rows an interrupted run logged after its checkpoint, or before its
    first one (and a line torn by the kill), so that the history and the loss curve hold every step once."""
    if not history_path.is_file():
        return
    kept = "".join(json.dumps(row) + "\n" for row in read_history(history_path) if row.get("step", 0) <= step)
    atomic_save(lambda tmp: Path(tmp).write_text(kept), history_path)


def plot_loss_curve(history_path: Path, png: Path) -> None:
    """Loss (and accuracy/PSNR if logged) against step, from the JSON-lines history."""
    rows = read_history(history_path)
    if not rows:
        return
    try:
        from matplotlib.figure import Figure  # no pyplot: a caller's backend and figures are left alone
    except ImportError:  # an optional extra: a run must not fail at its very end for a plot
        get_logger("star").warning("matplotlib is not installed: no %s (the history is in %s)", png.name,
                                   history_path.name)
        return
    extra = next((k for k in ("acc", "psnr") if k in rows[-1]), None)
    fig = Figure(figsize=(10 if extra else 5, 3.5))
    axes = fig.subplots(1, 2 if extra else 1, squeeze=False)
    for ax, key in zip(axes[0], ("loss", extra)):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label="training")
        val = [(r["step"], r[f"val_{key}"]) for r in rows if f"val_{key}" in r]
        if val:  # loop.eval_every
            ax.plot(*zip(*val), "o-", label="validation")
            ax.legend()
        ax.set(xlabel="step", ylabel=key, title=key)
    fig.tight_layout()
    fig.savefig(png, dpi=100)

