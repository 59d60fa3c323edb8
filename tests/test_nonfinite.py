"""The loop skips steps with a non-finite loss or gradient, stops after loop.max_nonfinite in a row, and keeps the
ranks of a DDP run in step when only one of them sees a non-finite loss."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.nonfinite_run import ToyStage, run
from tests.train_helpers import REPO
from trainer.loop import NonFiniteLossError
from trainer.state import find_resumable

CPU = torch.device("cpu")


def weights(stage: ToyStage) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in stage.model.parameters()])


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_step_is_skipped(tmp_path, kind):
    clean, spoilt = ToyStage(set(), kind), ToyStage({3}, kind)
    run(tmp_path / "clean", clean, 6, CPU)
    last = run(tmp_path / "spoilt", spoilt, 6, CPU)
    assert last["step"] == 6 and spoilt.calls == 7  # six steps taken, one batch spent on the skipped one
    assert torch.isfinite(weights(spoilt)).all()
    # The skipped step's batch is gone, so the weights differ from the clean run's, but not by much.
    assert not torch.equal(weights(spoilt), weights(clean))
    assert torch.allclose(weights(spoilt), weights(clean), atol=0.2)


def test_persistent_non_finite_stops_and_keeps_the_last_checkpoint(tmp_path):
    stage = ToyStage(set(range(5, 100)), "gradient")
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses or gradients in a row at step 4"):
        run(tmp_path, stage, 10, CPU, ckpt_every=2, max_nonfinite=3)
    path, ckpt = find_resumable(tmp_path)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_ddp_ranks_skip_together_when_one_rank_has_a_non_finite_loss(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "nonfinite_run.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["step"], r["calls"]) for r in ranks] == [(6, 7), (6, 7)]  # both took 6 steps from 7 batches
    assert ranks[0]["weights"] == ranks[1]["weights"]                     # and hold the same weights
    assert all(math.isfinite(w) for w in ranks[0]["weights"])
