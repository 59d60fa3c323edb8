"""Stop signals (trainer/stop.py): the run ends after the current step with a checkpoint there, and resuming from
it gives the weights of an uninterrupted run, bit for bit."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train_helpers import REPO, final_state, make_vqvae_dir, run_train, star_overrides
from trainer.stop import StopRequest, TrainingStopped


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory):
    return make_vqvae_dir(tmp_path_factory.mktemp("vq") / "vqvae")


def _equal_states(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _checkpoint_steps(out_dir):
    return sorted(int(p.name[5:13]) for p in out_dir.glob("ckpt-*.pt"))


def test_stop_request_records_the_first_signal_and_restores_the_handlers():
    # Python's own Ctrl-C handler, whatever this process inherited (a background job ignores SIGINT)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        with StopRequest() as request:
            assert request.signum == 0
            os.kill(os.getpid(), signal.SIGUSR1)  # delivered to this (main) thread before kill returns
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.signum == signal.SIGUSR1  # the first one counts
            with pytest.raises(KeyboardInterrupt):  # a Ctrl-C after a stop request interrupts at once
                os.kill(os.getpid(), signal.SIGINT)
        assert {sig: signal.getsignal(sig) for sig in before} == before
    finally:
        signal.signal(signal.SIGINT, inherited)
    stopped = TrainingStopped(signal.SIGTERM, 12, "out/ckpt-00000012.pt")
    assert stopped.exit_code == 143 and "SIGTERM at step 12" in str(stopped)


def test_stop_request_leaves_ignored_signals_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job
    try:
        with StopRequest() as request:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert request.signum == 0
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_checkpoints_the_current_step_and_resumes_bit_identical(tmp_path, vqvae_dir):
    steps, common = 20, {"loop.ckpt_every": 100}  # no periodic checkpoint before the last step
    full = run_train(star_overrides(tmp_path / "full", vqvae_dir, steps, **common))
    assert full.returncode == 0, full.stderr[-3000:]
    args = star_overrides(tmp_path / "cut", vqvae_dir, steps, **common)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py")] + args, env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "cut" / "log.txt"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = _checkpoint_steps(tmp_path / "cut")
    assert len(stopped_at) == 1 and 2 <= stopped_at[0] < steps, stopped_at
    assert f"SIGTERM received: stopping at step {stopped_at[0]}" in stderr
    assert "Run the same command again to resume" in stderr
    assert not (tmp_path / "cut" / "final").exists()
    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at[0]} " in resumed.stderr
    assert _equal_states(final_state(tmp_path / "full"), final_state(tmp_path / "cut"))


def test_a_signal_to_one_ddp_rank_stops_both_at_the_same_step(tmp_path, vqvae_dir):
    common = {"loop.ckpt_every": 100, "model.drop_path_rate": 0.0}
    full = run_train(star_overrides(tmp_path / "full", vqvae_dir, 8, **common), torchrun=2)
    assert full.returncode == 0, full.stderr[-3000:]
    args = star_overrides(tmp_path / "cut", vqvae_dir, 8, **common)
    # Rank 1 alone gets SIGUSR1 after step 3; rank 0 learns of it in step 4's all-reduce: both stop after step 4.
    cut = run_train(args, torchrun=2, script="tests/signal_one_rank.py",
                    env_extra={"STAR_SIGNAL": "SIGUSR1", "STAR_SIGNAL_RANK": "1", "STAR_SIGNAL_STEP": "3"})
    assert cut.returncode != 0
    assert "SIGUSR1 received: stopping at step 4" in cut.stderr, cut.stderr[-3000:]
    assert _checkpoint_steps(tmp_path / "cut") == [4]
    assert len(torch.load(tmp_path / "cut" / "ckpt-00000004.pt", weights_only=True)["rng"]) == 2
    resumed = run_train(args, torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _equal_states(final_state(tmp_path / "full"), final_state(tmp_path / "cut"))
