"""Builds the mtbert package and its extension ``mtbert._C``.

The C++ sources in ``csrc/`` are always compiled (``-O3``, OpenMP). The CUDA sources in
``csrc/cuda/`` (plain ``.cu`` kernels plus their ``.cpp`` torch bindings) are added only when
torch has CUDA and ``nvcc`` is found, or when ``MTBERT_FORCE_CUDA=1``.
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda():
    if os.environ.get("MTBERT_FORCE_CUDA") == "1":
        return True
    import torch

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # -fno-math-errno: sqrt that never sets errno is what lets the AdamW loop vectorize.
    cxx_flags = ["-O3", "-std=c++17", "-fno-math-errno", *openmp]
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "mtbert._C",
            sources,
            define_macros=[("MTBERT_WITH_CUDA", None)],
            # No --use_fast_math: it turns sqrtf and the division into approximations, and the AdamW
            # kernel is meant to match torch.optim.AdamW operation for operation (unchecked on a GPU so far).
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=openmp,
        )
    return CppExtension("mtbert._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)


setup(
    name="mtbert",
    version="0.1.0",
    description="Fast multitask BERT fine-tuning: Triton kernels, fused AdamW and flattened PCGrad",
    packages=find_packages(include=["mtbert", "mtbert.*"]),
    python_requires=">=3.10",
    ext_modules=[_extension()],
    entry_points={"console_scripts": ["mtbert-train=mtbert.train:main", "mtbert-plot=mtbert.multitask.plot:main",
                                        "mtbert-predict=mtbert.predict:main", "mtbert-pretrain=mtbert.pretrain:main"]},
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
