import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import dist
from utils.logging import get_logger

REPO = Path(__file__).resolve().parents[1]


def test_single_process_helpers(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["train.py", "--config=x.json"]
    device = dist.init_distributed(argv)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not dist.is_initialized()
    assert (dist.get_rank(), dist.get_world_size(), dist.get_local_rank()) == (0, 1, 0)
    assert dist.is_main_process()
    t = torch.tensor([3.0])
    assert dist.all_reduce_mean(t).item() == 3.0
    dist.barrier()  # no-op
    assert argv == ["train.py", "--config=x.json"]


def test_legacy_local_rank_argument_is_consumed():
    argv = ["train.py", "--local-rank=1", "--x=1"]
    assert dist.pop_local_rank_arg(argv) == 1 and argv == ["train.py", "--x=1"]
    argv = ["train.py", "--local_rank", "3", "--x=1"]
    assert dist.pop_local_rank_arg(argv) == 3 and argv == ["train.py", "--x=1"]
    assert dist.pop_local_rank_arg(["a"]) is None


def test_logger_writes_file_on_rank0(tmp_path):
    log = get_logger("star-test", tmp_path / "log.txt")
    log.info("hello %d", 7)
    for h in log.handlers:
        h.flush()
    assert "hello 7" in (tmp_path / "log.txt").read_text()



def test_a_second_run_in_one_process_logs_to_its_own_file_only(tmp_path):
    """A notebook training twice wrote the second run's lines into the first run's train.log as well."""
    first = get_logger("star-test-two", tmp_path / "first.log")
    first.info("run one")
    second = get_logger("star-test-two", tmp_path / "second.log")
    second.info("run two")
    get_logger("star-test-two").info("a warning from elsewhere")  # no file given: the current one stays
    for h in second.handlers:
        h.flush()
    assert (tmp_path / "first.log").read_text().count("run") == 1
    assert "run two" in (tmp_path / "second.log").read_text()
    assert "from elsewhere" in (tmp_path / "second.log").read_text()


@pytest.mark.parametrize("launcher", [
    ["torch.distributed.run", "--standalone"],   # torchrun
    ["torch.distributed.launch"],                # the legacy form of the official README (passes --local-rank)
])
def test_two_processes_all_reduce(launcher):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", *launcher, "--nproc_per_node=2", str(REPO / "tests" / "dist_allreduce.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok 1.5") == 2, proc.stdout


def test_train_ddp_script_runs_with_the_venv_python_only(tmp_path):
    """scripts/train_ddp.sh counted GPUs with the system's python3, which on a machine like this one has no
    torch: the script ended there. Here python3 on PATH is one that always fails."""
    from tests.train_helpers import vqvae_overrides
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho 'not this python' >&2\nexit 1\n")
    (fake / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("GPUS_PER_NODE", "STAR_VENV")}
    env.update(PATH=f"{fake}:{env['PATH']}", STAR_VENV=str(Path(sys.executable).parents[1]), OMP_NUM_THREADS="1")
    args = vqvae_overrides(**{"loop.steps": 1, "loop.out_dir": str(tmp_path / "run"), "data.shapes_count": 16})
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train_ddp.sh"), str(REPO / "configs" / "shapes_vqvae.json"),
                           *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "vqvae.safetensors").is_file()
