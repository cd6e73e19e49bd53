"""The CUDA sources compile without a GPU: each plain-CUDA kernel file with nvcc (sm_90), and the
torch bindings with the host compiler against this torch's headers and the CUDA toolkit's."""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def test_cuda_kernels_compile_with_nvcc(tmp_path):
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    assert sources, "no CUDA kernels found in csrc/cuda"
    jobs = [subprocess.Popen([NVCC, "-c", "-arch=sm_90", "-std=c++17", "-O3", str(src), "-o",
                              str(tmp_path / f"{src.stem}.o")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for src in sources]
    for src, job in zip(sources, jobs):
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, f"nvcc failed on {src.name}:\n{output}"


def test_cuda_bindings_compile(tmp_path):
    # nvcc may be a wrapper script outside the toolkit: look where CUDA usually lives too.
    candidates = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), str(Path(NVCC).resolve().parents[1]),
                  "/usr/local/cuda"]
    cuda_include = next((Path(c) / "include" for c in candidates if c and (Path(c) / "include" / "cuda_runtime_api.h").exists()),
                        Path("/usr/local/cuda/include"))
    if not (cuda_include / "cuda_runtime_api.h").exists():
        pytest.skip(f"CUDA headers not found in {cuda_include}")
    # CPU wheels of torch ship the c10/cuda headers but not this file CMake generates for CUDA builds.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    command = [compiler, "-fsyntax-only", "-std=c++17", "-w", *includes, f"-I{sysconfig.get_paths()['include']}",
               f"-I{tmp_path}", f"-I{cuda_include}", "-DMTBERT_WITH_CUDA"]
    for source in sorted((CSRC / "cuda").glob("*.cpp")):
        result = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{source.name} does not compile:\n{result.stderr[-4000:]}"
