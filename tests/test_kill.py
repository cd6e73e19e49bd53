"""A training process killed with SIGKILL at seeded points (after an optimizer step, and inside a
checkpoint write between the data reaching the disk and the rename) and resumed each time ends
with the uninterrupted run's metrics.jsonl (timings aside), best.pt and prediction files.

The kills come from the process itself (``$MTBERT_TEST_SIGKILL_AT``, see
``mtbert.multitask.checkpoint.kill_point``), so they land at the same place on every machine."""
import json
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from mtbert.multitask.checkpoint import KILL_ENV, load_checkpoint
from mtbert.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
STEPS = 8  # 2 epochs of 4 steps (64 examples per task, batches of 16)


def _argv(tiny_model_dir, toy_data, out):
    # PCGrad's projection order, proportional task sampling and dropout all draw random numbers.
    return ["--data", str(toy_data), "--model", str(tiny_model_dir), "--out", str(out), "--epochs", "2",
            "--batch_size", "16", "--lr", "1e-3", "--max-train-examples", "64", "--max-dev-examples", "12",
            "--max-length", "32", "--grad-method", "pcgrad", "--task-sampling", "proportional",
            "--hidden_dropout_prob", "0.2", "--save-every", "2", "--log-every", "5", "--no-progress"]


def _metrics(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("examples_per_s", "train_minutes")} for r in records]


def test_sigkill_at_seeded_points_then_resume_equals_uninterrupted_run(tiny_model_dir, toy_data, tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop(KILL_ENV, None)

    def train(out, *flags, kill_at=None):
        return subprocess.Popen([sys.executable, "-m", "mtbert.train", *_argv(tiny_model_dir, toy_data, out), *flags],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**environment, **({KILL_ENV: kill_at} if kill_at else {})})

    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float summation order
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert train_main(_argv(tiny_model_dir, toy_data, reference)) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "killed"
    rng = random.Random(16)
    kills = []
    for kind in ("step", "save", None):
        last = out / "last.pt"
        done = load_checkpoint(last)["global_step"] if last.is_file() else 0
        # A step after the first checkpoint (saves every 2 steps, and at each epoch end best.pt then
        # last.pt), then the 1st or 2nd checkpoint write of the resumed process.
        point = {"step": f"step:{rng.randint(3, STEPS - 1)}", "save": f"save:{rng.randint(1, 2)}", None: None}[kind]
        process = train(out, *(["--resume", str(last)] if last.is_file() else []), kill_at=point)
        _, errors = process.communicate()
        assert process.returncode == (-signal.SIGKILL if point else 0), (point, errors[-2000:])
        kills.append((point, done))
    assert kills == [("step:5", 0), ("save:2", 4), (None, 6)], kills  # what seed 16 draws, and where each resumed
    assert not list(out.glob(".*.tmp"))  # the temporary file of the killed write was cleaned up

    assert _metrics(out) == _metrics(reference)
    best, best_reference = load_checkpoint(out / "best.pt"), load_checkpoint(reference / "best.pt")
    assert (best["epoch"], best["scores"], best["config"]["epochs"]) == (best_reference["epoch"],
                                                                         best_reference["scores"], 2)
    for name, value in best_reference["model"].items():
        assert torch.equal(best["model"][name], value), name
    predictions = sorted(p.name for p in (reference / "predictions").iterdir())
    assert len(predictions) == 6
    for name in predictions:
        assert (out / "predictions" / name).read_bytes() == (reference / "predictions" / name).read_bytes(), name
