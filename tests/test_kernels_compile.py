"""The ahead-of-time compile gate (mtbert.kernels.compile_check): the Triton kernels compiled for
sm_90, sm_80, sm_89 and sm_86 without a GPU, in the configurations the GPU launchers use.

The compiles run in a subprocess without TRITON_INTERPRET (conftest.py turns the interpreter on,
and the interpreter gets small test-sized blocks), two at a time; ``make compile-check`` runs the
full matrix."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.backends.nvidia.compiler", reason="needs Triton's NVIDIA backend (ptxas)")

from mtbert import kernels  # noqa: E402
from mtbert.kernels import _triton  # noqa: E402
from mtbert.kernels.compile_check import KERNELS, TARGETS, parse_ptxas_log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_gate(*args):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "mtbert.kernels.compile_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_kernel_compiles_for_every_target_without_spills():
    """The representative subset: every kernel on every target, the largest attention tiles
    with dropout, every dtype; fits shared memory, no spills."""
    gate = run_gate("--jobs", "2")
    assert gate.returncode == 0, gate.stdout[-6000:] + gate.stderr[-3000:]
    table = [line.split(" | ") for line in gate.stdout.splitlines() if line.count(" | ") >= 10][1:]
    compiled = {(row[0].strip(), row[1].strip()) for row in table}
    assert compiled == {(kernel, target) for kernel in KERNELS for target in TARGETS}
    assert {row[2].strip() for row in table} == {"float32", "float16", "bfloat16"}
    assert all(row[-1].strip() == "ok" and row[8].strip() == "0" for row in table)
    # The configurations are the GPU launcher's, not the interpreter's 16×16 test blocks.
    assert all("num_warps=8" in row[5] for row in table if row[0].strip() == "attention_fwd")


def test_gate_fails_on_a_spilling_kernel():
    """A register cap of 32 per thread forces the attention forward kernel to spill."""
    gate = run_gate("--kernel", "attention_fwd", "--target", "sm_89", "--maxnreg", "32", "--jobs", "1")
    assert gate.returncode == 1, gate.stdout + gate.stderr
    assert "spills" in gate.stdout and "FAIL" in gate.stdout


def test_gate_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    gate = subprocess.run([sys.executable, "-m", "mtbert.kernels.compile_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert gate.returncode == 2 and "TRITON_INTERPRET" in gate.stderr


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
           "ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size\n")
    assert parse_ptxas_log(log) == (255, 32)
    with pytest.raises(ValueError, match="cannot parse"):
        parse_ptxas_log("ptxas info    : Used 40 registers\n")  # no spill line
    with pytest.raises(ValueError, match="cannot parse"):
        parse_ptxas_log("ptxas fatal   : Unresolved extern function\n")


class FakeCudaTensor:
    """Just what the dispatcher reads of a tensor: a CUDA tensor on a machine without CUDA."""
    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, dtype):
        self.dtype = dtype


@pytest.mark.skipif(not _triton.triton_available(), reason="needs Triton")
def test_bfloat16_before_sm80_falls_back_or_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(_triton, "can_launch", lambda tensor: True)
    monkeypatch.setattr(kernels, "can_launch", lambda tensor: True)
    monkeypatch.setenv("MTBERT_KERNELS", "auto")
    assert not kernels.use_triton(FakeCudaTensor(torch.bfloat16))  # falls back to PyTorch
    assert kernels.use_triton(FakeCudaTensor(torch.float16))
    with pytest.raises(ValueError, match="Tesla T4 is 7.5"):
        _triton.check_launchable("q", FakeCudaTensor(torch.bfloat16))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert kernels.use_triton(FakeCudaTensor(torch.bfloat16))
