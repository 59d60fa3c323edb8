"""scripts/check_training.py (the training loop end to end through train.py, for GPU machines) keeps its JSON
contract and passes on this CPU: exact resume after SIGTERM, validation rows, falling losses."""
import json
import os
import subprocess
import sys

from tests.helpers import REPO


def test_check_training_passes_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_training.py"), "--steps", "6",
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["failures"] == [], (report, proc.stderr[-2000:])
    assert report["device"] == "cpu" and report["stop_exit_code"] == 143 and report["stopped_at_step"][0] < 6
    assert report["resume_identical"] and report["resume_max_abs_diff"] == 0.0
    assert sorted(report["validation"]) == ["3", "6"] and "val_loss" in report["validation"]["6"]
    assert (tmp_path / "runs" / "star_cut" / "final" / "model.safetensors").is_file()
