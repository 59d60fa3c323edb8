import os
from pathlib import Path

import pytest

# Never reach for a model hub from tests (an offline lookup otherwise retries for minutes).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("STAR_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "tiny_star_golden.safetensors").is_file():
        pytest.fail(f"reference data not found in {REFERENCE_DIR}; set STAR_REFERENCE_DIR to the folder holding "
                    "the official golden tensors (shared/reference)")
    return REFERENCE_DIR
