"""What every Triton op shares: the optional import of Triton, block-size choices, and the input
checks whose errors name the offending argument.

Triton is optional: without it ``triton.jit`` kernels are left as plain functions that are never
launched (the dispatcher in ``__init__`` checks :func:`triton_available` first), and the PyTorch
references keep working. Op modules use ``from __future__ import annotations`` so that their
``tl.constexpr`` annotations are not evaluated when Triton is missing.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch references still work
    triton = None
    tl = None

# Triton reads this when a kernel is decorated, so it is read once, at import, here too.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Largest row the one-row-per-program LayerNorm kernels hold in registers.
MAX_FUSED_ROW = 65536 // 4


def jit(fn):
    """``triton.jit`` when Triton is installed, else the undecorated function (never launched)."""
    return fn if triton is None else triton.jit(fn)


def constexpr(value):
    """A module-level constant a kernel may read: compiled kernels only see ``tl.constexpr``
    globals (the interpreter sees any global, so only a GPU compile catches a plain float)."""
    return value if tl is None else tl.constexpr(value)


def triton_available() -> bool:
    return triton is not None


def can_launch(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensor``: natively on CUDA, or in the CPU interpreter
    when ``TRITON_INTERPRET=1`` was set before mtbert was imported."""
    if triton is None:
        return False
    return tensor.is_cuda or (INTERPRETED and tensor.device.type == "cpu")


def gpu_unsupported_reason(tensor) -> str | None:
    """Why the kernels cannot serve ``tensor``'s dtype on its GPU, or None: bfloat16 dots need
    compute capability 8.0 (Ampere) or newer."""
    if tensor.is_cuda and tensor.dtype == torch.bfloat16:
        major, minor = torch.cuda.get_device_capability(tensor.device)
        if major < 8:
            gpu = torch.cuda.get_device_name(tensor.device)
            return (f"bfloat16 needs a GPU of compute capability 8.0 or newer, and {gpu} is {major}.{minor}: "
                    "use float16 or MTBERT_KERNELS=torch")
    return None


def check_launchable(name: str, tensor: torch.Tensor):
    if not can_launch(tensor):
        reason = f"{name} cannot go to the Triton kernels: Triton is not installed" if triton is None else (
            f"{name} is on {tensor.device}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
            "before importing mtbert")
        raise ValueError(reason)
    unsupported = gpu_unsupported_reason(tensor)
    if unsupported is not None:
        raise ValueError(f"{name} cannot go to the Triton kernels: {unsupported}")


def row_block(n: int, name: str):
    """(BLOCK_N, num_warps) for kernels that hold one row of ``n`` elements per program."""
    if n > MAX_FUSED_ROW:
        raise ValueError(f"{name} has {n} features per row, more than the {MAX_FUSED_ROW} the fused kernel holds")
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


def attention_blocks(head_dim: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the attention kernels for one head size and
    input dtype. The interpreter gets small blocks, so that the tests' lengths 1…70 span several of
    them. On a GPU these are tiles without register spills on sm_80…sm_90, in every dtype, head
    size and dropout setting (``python -m mtbert.kernels.compile_check --full``). The dK/dV kernel
    is the tightest: with 16-bit inputs, 64×64 tiles on 4 or 8 warps and 64×32 on 4 or 8 warps
    spilled. float32 dots are exact FMA loops whose operands stay in registers, so head dim 128
    needs 16×32 on 8 warps (32×32 on 4 or 8 warps and 16×32 on 4 warps spilled). Head dim 16
    takes 4 warps (its dQ kernel spilled on sm_80 with 8). Not yet tuned for speed on a GPU.
    """
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(f"head_dim must be 16, 32, 64 or 128, got {head_dim}")
    if INTERPRETED:
        return 16, 16, 4, 1
    if dtype == torch.float32 and head_dim == 128:
        return 16, 32, 8, 2
    return 32, 32, 4 if head_dim == 16 else 8, 2


def dot_in_float32(dtype: torch.dtype) -> bool:
    """Whether matmul operands must be upcast to float32: Triton's interpreter (3.x) multiplies
    the raw bits of bfloat16 tensors in ``tl.dot``. On a GPU bfloat16 dots run natively."""
    return INTERPRETED and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: exact float32 products for float32 inputs, as torch.matmul
    does by default (Triton would otherwise use TF32 and lose ~3 digits); native for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, tensor, dims=None, dtypes=FLOAT_DTYPES, like=None, shape=None, contiguous=True):
    """Raises ValueError naming ``name`` unless ``tensor`` is a tensor with ``dims`` dimensions (or
    exactly ``shape``), one of ``dtypes``, on the device of ``like``, contiguous if asked."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dims is not None and tensor.dim() not in ((dims,) if isinstance(dims, int) else dims):
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(tensor.shape)}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if like is not None and tensor.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {tensor.device}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()} for shape {tuple(tensor.shape)}")


def check_finite(name: str, tensor: torch.Tensor):
    """NaN/inf check, run only under ``torch.autograd.set_detect_anomaly(True)``: it synchronises
    a GPU, so the hot path skips it, as PyTorch's own anomaly mode does."""
    if torch.is_anomaly_enabled() and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
