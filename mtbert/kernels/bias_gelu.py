"""Bias add fused with the exact (erf) GELU: y = GELU(x + bias).

GELU(z) = z Φ(z) with Φ the standard normal CDF, so GELU'(z) = Φ(z) + z φ(z). Backward recomputes
z from the saved input (no activation buffer); dbias is reduced in two stages, float32 partial
column sums per block of rows and then one sum (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import check_finite, check_launchable, check_tensor, constexpr, jit, tl, triton

_SQRT1_2 = constexpr(0.7071067811865476)
_INV_SQRT_2PI = constexpr(0.3989422804014327)


@jit
def _bias_gelu_fwd_kernel(
    x_ptr,  # [M, N]
    bias_ptr,  # [N]
    y_ptr,  # [M, N]
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None] * N + cols[None, :]
    z = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    z += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)


@jit
def _bias_gelu_bwd_kernel(
    grad_y_ptr,  # [M, N]
    x_ptr,  # [M, N]
    bias_ptr,  # [N]
    grad_x_ptr,  # [M, N]
    bias_partial_ptr,  # [cdiv(M, BLOCK_M), N] float32
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row_block = tl.program_id(0).to(tl.int64)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None] * N + cols[None, :]
    z = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    z += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    grad_y = tl.load(grad_y_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    grad_x = grad_y * (cdf + z * pdf)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=inside)
    tl.store(bias_partial_ptr + row_block * N + cols, tl.sum(tl.where(inside, grad_x, 0.0), axis=0), mask=cols < N)


def _check_inputs(x, bias):
    check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_tensor("bias", bias, like=x, shape=(x.shape[-1],))


def kernel_settings() -> dict:
    """Block sizes of both kernels: what the launchers pass, and what the compile gate
    (mtbert.kernels.compile_check) compiles for each GPU target."""
    return dict(BLOCK_M=32, BLOCK_N=128)


def _grid(M, N):
    settings = kernel_settings()
    return triton.cdiv(M, settings["BLOCK_M"]), triton.cdiv(N, settings["BLOCK_N"])


def bias_gelu_forward(x, bias):
    """y = GELU(x + bias). x: [..., N] contiguous float32/float16/bfloat16; bias: [N], any float
    dtype. Returns y in x's dtype and shape."""
    _check_inputs(x, bias)
    check_launchable("x", x)
    check_finite("x", x)
    N = x.shape[-1]
    M = x.numel() // N
    y = torch.empty_like(x)
    _bias_gelu_fwd_kernel[_grid(M, N)](x, bias, y, M, N, **kernel_settings())
    return y


def bias_gelu_backward(grad_y, x, bias):
    """Gradients of :func:`bias_gelu_forward`: grad_x (x's dtype) and grad_bias (bias's dtype)."""
    check_tensor("grad_y", grad_y, dtypes=None, like=x, shape=x.shape)
    N = x.shape[-1]
    M = x.numel() // N
    grid = _grid(M, N)
    grad_x = torch.empty_like(x)
    bias_partial = torch.empty(grid[0], N, dtype=torch.float32, device=x.device)
    _bias_gelu_bwd_kernel[grid](grad_y, x, bias, grad_x, bias_partial, M, N, **kernel_settings())
    return grad_x, bias_partial.sum(0).to(bias.dtype)


# The kernels as PyTorch custom ops, so that torch.compile(fullgraph=True) traces through them.
@torch.library.custom_op("mtbert::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_gelu_forward(x, bias)


@_bias_gelu_op.register_fake
def _(x, bias):
    return torch.empty_like(x)


@torch.library.custom_op("mtbert::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(grad_y: torch.Tensor, x: torch.Tensor,
                           bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return bias_gelu_backward(grad_y, x, bias)


@_bias_gelu_backward_op.register_fake
def _(grad_y, x, bias):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    return _bias_gelu_backward_op(grad_y.contiguous(), x, bias)


_bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu_triton(x, bias):
    """The Triton op (mtbert::bias_gelu) with autograd; same contract as :func:`bias_gelu_reference`."""
    _check_inputs(x, bias)
    return _bias_gelu_op(x, bias)


def bias_gelu_reference(x, bias):
    """PyTorch reference. x: [..., N]; bias: [N]."""
    return F.gelu(x + bias, approximate="none")
