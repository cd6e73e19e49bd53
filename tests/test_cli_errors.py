"""What the command lines answer to bad input: one line naming the file, line, key or flag and exit
status 2 for a user's mistake (`--debug` adds the traceback); a bug keeps its traceback. Also the
checkpoint write under a full disk, SIGTERM during training, and --resume with contradicting flags."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mtbert.data import main as data_main
from mtbert.multitask import checkpoint as checkpoints
from mtbert.multitask.trainer import Trainer
from mtbert.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def _argv(tiny_model_dir, toy_data, out, *flags):
    return ["--data", str(toy_data), "--model", str(tiny_model_dir), "--out", str(out), "--epochs", "1",
            "--batch_size", "16", "--lr", "1e-3", "--max-train-examples", "32", "--max-dev-examples", "8",
            "--max-length", "32", "--no-progress", *map(str, flags)]


@pytest.fixture
def train(tiny_model_dir, toy_data, tmp_path, capsys):
    """Runs ``mtbert-train`` in-process on the toy data and tiny model with extra flags; returns
    (exit status, the error lines on stderr); ``train.stderr`` holds all of stderr."""
    def run(*flags, out=None):
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status = train_main(_argv(tiny_model_dir, toy_data, out or tmp_path / "run", *flags))
        run.stderr = capsys.readouterr().err
        return status, [line for line in run.stderr.splitlines() if line.startswith("mtbert-train")]
    return run


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, toy_data, tmp_path_factory):
    """A finished one-epoch run's output directory (last.pt, best.pt), shared by the resume tests."""
    out = tmp_path_factory.mktemp("finished")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(_argv(tiny_model_dir, toy_data, out, "--save-every", "0")) == 0
    return out


def _bad_file(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


SST_HEADER = b"\tid\tsentence\tsentiment\n"
BAD_DATA_FILES = {
    "not-utf8": (SST_HEADER + b"0\ta\tgood film\t3\n1\tb\tna\xefve caf\xe9\t2\n", r"line 3: byte 0xef is not UTF-8"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file, not tab-separated text"),
    "empty": (b"", "is empty: a SST-5 sentiment file starts with a header line"),
    "missing-column": (b"\tid\tsentence\n0\ta\tgood film\n", r"missing column\(s\) \['sentiment'\]"),
    "no-rows": (SST_HEADER, "has no usable training rows"),
    "bad-labels": (SST_HEADER + b"0\ta\tgood\t9\n1\tb\tbad\tx\n", "has no usable training rows"),
}


@pytest.mark.parametrize("case", BAD_DATA_FILES)
def test_bad_data_file_gives_one_line_and_status_2(train, tmp_path, case):
    content, message = BAD_DATA_FILES[case]
    path = _bad_file(tmp_path, f"{case}.csv", content)
    status, errors = train("--sst_train", path)
    assert status == 2 and len(errors) == 1, errors
    assert str(path) in errors[0] and re.search(message, errors[0]), errors[0]


def test_missing_and_directory_data_paths(train, tmp_path):
    status, errors = train("--sts_dev", tmp_path / "nowhere.csv")
    assert status == 2 and errors == [f"mtbert-train: error: sts data file {tmp_path / 'nowhere.csv'} does not exist "
                                      "(get the CS224N files with `python -m mtbert.data download --to DIR`)"]
    status, errors = train("--sts_dev", tmp_path)
    assert status == 2 and "is a directory, not a file" in errors[0]


def test_data_check_command_reports_each_unusable_file(toy_data, tmp_path, capsys):
    directory = tmp_path / "data"
    directory.mkdir()
    for name in ("ids-sst-train.csv", "quora-dev.csv"):
        (directory / name).write_bytes((toy_data / name).read_bytes())
    (directory / "sts-train.csv").write_bytes(b"\tid\tsentence1\tsentence2\tsimilarity\n0\ta\t\xff\tb\t1.0\n")
    assert data_main(["check", str(directory)]) == 2
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "rows" in lines["ids-sst-train.csv"] and "rows" in lines["quora-dev.csv"]
    assert "unusable:" in lines["sts-train.csv"] and "line 2: byte 0xff is not UTF-8" in lines["sts-train.csv"]
    assert lines["sts-dev.csv"].endswith("missing")
    assert data_main(["synthetic", "--to", str(directory / "ids-sst-train.csv" / "x")]) == 2
    assert "cannot create the data directory" in capsys.readouterr().err


def test_bad_flag_values(train, tmp_path, capsys):
    for flags, message in [(("--warmup", 1.5), "warmup is a fraction of the steps in [0, 1), got 1.5"),
                           (("--lr", "nan"), "lr must be a positive finite number, got nan"),
                           (("--batch_size", 0), "batch_size must be >= 1, got 0"),
                           (("--tasks", "sst,para", "--grad-method", "main-aux", "--main-task", "sts"),
                            "main_task 'sts' is not among the trained tasks"),
                           (("--model", tmp_path / "no-model"), "Could not find the model")]:
        status, errors = train(*flags)
        assert status == 2 and len(errors) == 1 and message in errors[0], (flags, errors)
    for flags, message in [(("--loss-weights", "sts=small"), "weight of 'sts' is not a number: 'small'"),
                           (("--epochs", "two"), "invalid int value: 'two'"), (("--pooling", "max"), "invalid choice")]:
        with pytest.raises(SystemExit) as exit_info:
            train(*flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_out_under_a_regular_file(train, tmp_path):
    blocker = _bad_file(tmp_path, "a-file", b"x")
    status, errors = train(out=blocker / "run")
    assert status == 2 and errors == [f"mtbert-train: error: cannot create the output directory {blocker / 'run'}: "
                                      f"Not a directory ({blocker / 'run'})"]


def test_truncated_and_foreign_checkpoints(train, tmp_path, finished_run):
    done = finished_run
    whole = (done / "last.pt").read_bytes()
    cases = {
        "truncated.pt": (whole[: len(whole) // 2], "is truncated or not a PyTorch checkpoint (RuntimeError: "),
        "text.pt": (b"epoch 3, step 40\n", "is truncated or not a PyTorch checkpoint (UnpicklingError: "),
        "empty.pt": (b"", "is truncated or not a PyTorch checkpoint (EOFError: "),
    }
    for name, (content, message) in cases.items():
        status, errors = train("--resume", _bad_file(tmp_path, name, content))
        assert status == 2 and len(errors) == 1 and message in errors[0], errors
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "weights.pt")
    for name, message in [("tensor.pt", "holds a Tensor, not a checkpoint dict"),
                          ("weights.pt", "is not a training checkpoint of mtbert-train (format None, expected 2)")]:
        status, errors = train("--resume", tmp_path / name)
        assert status == 2 and message in errors[0], errors
    older = checkpoints.load_checkpoint(done / "last.pt")
    older["format"] = 1
    torch.save(older, tmp_path / "older.pt")
    status, errors = train("--resume", tmp_path / "older.pt")
    assert status == 2 and "was written by an older mtbert (checkpoint format 1" in errors[0], errors
    newer = checkpoints.load_checkpoint(done / "last.pt")
    newer["config"]["warp_drive"] = True
    torch.save(newer, tmp_path / "newer.pt")
    status, errors = train("--resume", tmp_path / "newer.pt")
    assert status == 2 and "holds settings this version does not know (warp_drive)" in errors[0], errors
    status, errors = train("--resume", done / "best.pt")
    assert status == 2 and "is a best-model checkpoint (best.pt)" in errors[0] and "resume from last.pt" in errors[0]
    status, errors = train("--resume", tmp_path / "none.pt")
    assert status == 2 and errors == [f"mtbert-train: error: checkpoint {tmp_path / 'none.pt'} does not exist"]


def test_resume_rejects_contradicting_flags(train, tmp_path, finished_run):
    done = finished_run
    status, errors = train("--resume", done / "last.pt", "--lr", "1e-2", "--sts-loss", "cosent", out=done)
    assert status == 2 and len(errors) == 1
    assert "--lr 0.01 (the checkpoint has 0.001); --sts-loss cosent (the checkpoint has mse)" in errors[0]
    status, errors = train("--resume", done / "last.pt", out=tmp_path / "elsewhere")
    assert status == 2 and "--out" in errors[0]
    # The run's own flags repeated, and --no-progress, are fine (training is over: it only predicts).
    status, errors = train("--resume", done / "last.pt", "--lr", "0.001", out=done)
    assert (status, errors) == (0, [])


def test_debug_shows_the_traceback(train, tmp_path):
    path = _bad_file(tmp_path, "empty.csv", b"")
    assert train("--sst_train", path)[0] == 2 and "Traceback" not in train.stderr
    assert train("--sst_train", path, "--debug")[0] == 2
    assert "Traceback (most recent call last)" in train.stderr and "in load_task_file" in train.stderr
    assert train.stderr.splitlines()[-1] == (f"mtbert-train: error: {path} is empty: a SST-5 sentiment file starts "
                                             "with a header line naming its columns ['id', 'sentence', 'sentiment']")


def test_user_error_from_the_real_entry_point(tmp_path):
    """The installed command's path (``sys.exit(main())``): one line on stderr, status 2."""
    command = [sys.executable, "-m", "mtbert.train", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "none")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"mtbert-train: error: Could not find the model '{tmp_path / 'none'}'. Looked in: the directory "
        f"{tmp_path / 'none'}. mtbert never downloads weights: pass a directory containing config.json and "
        "model.safetensors (or pytorch_model.bin), e.g. one saved with transformers' save_pretrained, or fetch "
        "the model into your Hugging Face cache first (huggingface-cli download NAME)."]


def test_an_internal_error_keeps_its_traceback(train, monkeypatch):
    """A bug is not a user error: the CLI must not turn it into a one-line message."""
    def broken(self):
        raise KeyError("a bug")

    monkeypatch.setattr(Trainer, "fit", broken)
    with pytest.raises(KeyError, match="a bug"):
        train()


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(train, tmp_path, monkeypatch):
    fsync, calls = os.fsync, []

    def full_disk_on_second_write(descriptor):
        calls.append(descriptor)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", full_disk_on_second_write)
    out = tmp_path / "full"
    status, errors = train("--save-every", "1", "--max-train-examples", "64", out=out)  # 4 steps
    last = out / "last.pt"
    assert status == 2 and errors == [f"mtbert-train: error: could not write the checkpoint {last}: "
                                      "No space left on device; the previous one is intact"]
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(last)["global_step"] == 1  # the second write failed, at step 2
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt"]  # no temporary file left


def _metrics_without_timings(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("examples_per_s", "train_minutes")} for r in records]


def test_sigterm_checkpoints_at_the_step_boundary_and_resume_matches(train, tmp_path, monkeypatch):
    """SIGTERM during step 3 (of 4 per epoch, 2 epochs): the step finishes, last.pt is written,
    status 143; resuming gives the uninterrupted run's metrics.jsonl (the loss window of steps 1-3,
    logged at step 4, survives) and predictions."""
    flags = ("--epochs", 2, "--log-every", 4, "--save-every", 0, "--grad-method", "pcgrad")
    assert train(*flags, out=tmp_path / "reference")[0] == 0

    original, steps = Trainer.train_step, []

    def train_step(self, tasks):
        steps.append(self.global_step)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, tasks)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "stopped"
    status, errors = train(*flags, out=out)
    assert status == 128 + signal.SIGTERM
    assert errors == [f"mtbert-train: stopped by SIGTERM after step 3; resume with --resume {out / 'last.pt'}"]
    assert checkpoints.load_checkpoint(out / "last.pt")["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed after training
    monkeypatch.undo()
    assert train(*flags, "--resume", out / "last.pt", out=out)[0] == 0
    assert _metrics_without_timings(out) == _metrics_without_timings(tmp_path / "reference")
    for name in ("sst-dev-output.csv", "sts-test-output.csv"):
        assert (out / "predictions" / name).read_bytes() == (tmp_path / "reference" / "predictions" / name).read_bytes()
