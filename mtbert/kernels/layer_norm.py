"""LayerNorm fused with the residual add: y = LN(x + residual) * weight + bias.

Forward keeps float32 mean and 1/std per row; backward recomputes z = x + residual from the inputs
(no extra buffer) and uses the LayerNorm input gradient
    dz = rstd * (g - mean(g) - ẑ * mean(g * ẑ)),   g = dy * weight,  ẑ = (z - mean) * rstd,
which is also d_residual. dweight = Σ dy * ẑ and dbias = Σ dy are reduced in two stages: float32
partial sums per program, then one sum over programs (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import check_launchable, check_finite, check_tensor, jit, row_block, tl, triton


@jit
def _add_layer_norm_fwd_kernel(
    x_ptr,  # [M, N]
    residual_ptr,  # [M, N]; not read when HAS_RESIDUAL is False
    weight_ptr,  # [N]
    bias_ptr,  # [N]
    y_ptr,  # [M, N]
    mean_ptr,  # [M] float32
    rstd_ptr,  # [M] float32
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    z = tl.load(x_ptr + row * N + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        z += tl.load(residual_ptr + row * N + cols, mask=in_row, other=0.0).to(tl.float32)
    mean = tl.sum(z, axis=0) / N
    centered = tl.where(in_row, z - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    y = centered * rstd * weight + bias
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=in_row)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@jit
def _add_layer_norm_bwd_kernel(
    grad_y_ptr,  # [M, N]
    x_ptr,  # [M, N]
    residual_ptr,  # [M, N]; not read when HAS_RESIDUAL is False
    weight_ptr,  # [N]
    mean_ptr,  # [M] float32
    rstd_ptr,  # [M] float32
    grad_z_ptr,  # [M, N]: the gradient of x and of residual
    weight_partial_ptr,  # [programs, N] float32
    bias_partial_ptr,  # [programs, N] float32
    M,
    N,
    rows_per_program,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    grad_weight = tl.zeros((BLOCK_N,), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for row in range(first, last):
        z = tl.load(x_ptr + row * N + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            z += tl.load(residual_ptr + row * N + cols, mask=in_row, other=0.0).to(tl.float32)
        grad_y = tl.load(grad_y_ptr + row * N + cols, mask=in_row, other=0.0).to(tl.float32)
        z_hat = tl.where(in_row, (z - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
        g = grad_y * weight
        grad_z = (g - tl.sum(g, axis=0) / N - z_hat * (tl.sum(g * z_hat, axis=0) / N)) * tl.load(rstd_ptr + row)
        tl.store(grad_z_ptr + row * N + cols, grad_z.to(grad_z_ptr.dtype.element_ty), mask=in_row)
        grad_weight += grad_y * z_hat
        grad_bias += grad_y
    tl.store(weight_partial_ptr + program * N + cols, grad_weight, mask=in_row)
    tl.store(bias_partial_ptr + program * N + cols, grad_bias, mask=in_row)


def _check_inputs(x, residual, weight, bias, eps):
    check_tensor("x", x)
    N = x.shape[-1]
    if x.dim() == 0 or N == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), like=x, shape=x.shape)
    check_tensor("weight", weight, like=x, shape=(N,))
    check_tensor("bias", bias, like=x, shape=(N,))
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    row_block(N, "x")


def kernel_settings(n: int, has_residual: bool) -> dict:
    """Constexprs and launch options of both kernels for rows of ``n`` features: what the launchers
    pass, and what the compile gate (mtbert.kernels.compile_check) compiles for each GPU target."""
    BLOCK_N, num_warps = row_block(n, "x")
    return dict(HAS_RESIDUAL=has_residual, BLOCK_N=BLOCK_N, num_warps=num_warps)


def add_layer_norm_forward(x, residual, weight, bias, eps):
    """y = LN(x + residual) * weight + bias over the last dimension.

    x, residual: [..., N] contiguous, float32/float16/bfloat16, same dtype (residual may be None);
    weight, bias: [N] any float dtype. Returns y (x's dtype and shape) and the float32 per-row
    mean and 1/std ([M], M = x.numel() // N).
    """
    _check_inputs(x, residual, weight, bias, eps)
    check_launchable("x", x)
    check_finite("x", x)
    if residual is not None:
        check_finite("residual", residual)
    N = x.shape[-1]
    M = x.numel() // N
    y = torch.empty_like(x)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    _add_layer_norm_fwd_kernel[(M,)](
        x, x if residual is None else residual, weight, bias, y, mean, rstd, N, eps,
        **kernel_settings(N, residual is not None))
    return y, mean, rstd


def add_layer_norm_backward(grad_y, x, residual, weight, mean, rstd):
    """Gradients of :func:`add_layer_norm_forward`. grad_y: [..., N] like x. Returns grad_z (the
    gradient of both x and residual, x's dtype), grad_weight and grad_bias (weight's dtype)."""
    check_tensor("grad_y", grad_y, dtypes=None, like=x, shape=x.shape)
    N = x.shape[-1]
    M = x.numel() // N
    if x.is_cuda:
        programs = min(M, torch.cuda.get_device_properties(x.device).multi_processor_count * 4)
    else:
        programs = min(M, 8)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    grad_z = torch.empty_like(x)
    weight_partial = torch.empty(programs, N, dtype=torch.float32, device=x.device)
    bias_partial = torch.empty(programs, N, dtype=torch.float32, device=x.device)
    _add_layer_norm_bwd_kernel[(programs,)](
        grad_y, x, x if residual is None else residual, weight, mean, rstd, grad_z, weight_partial,
        bias_partial, M, N, rows_per_program, **kernel_settings(N, residual is not None))
    return grad_z, weight_partial.sum(0).to(weight.dtype), bias_partial.sum(0).to(weight.dtype)


# The kernels as PyTorch custom ops, so that torch.compile(fullgraph=True) traces through them.
@torch.library.custom_op("mtbert::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_forward(x, residual, weight, bias, eps)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("mtbert::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(grad_y: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                                weight: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_backward(grad_y, x, residual, weight, mean, rstd)


@_add_layer_norm_backward_op.register_fake
def _(grad_y, x, residual, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd)
    ctx.has_residual = residual is not None


def _backward(ctx, grad_y, grad_mean, grad_rstd):  # mean and rstd are internal outputs: no gradient
    x, residual, weight, mean, rstd = ctx.saved_tensors
    grad_z, grad_weight, grad_bias = _add_layer_norm_backward_op(
        grad_y.contiguous(), x, residual if ctx.has_residual else None, weight, mean, rstd)
    return grad_z, grad_z if ctx.has_residual else None, grad_weight, grad_bias, None


_add_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def add_layer_norm_triton(x, residual, weight, bias, eps):
    """The Triton op (mtbert::add_layer_norm) with autograd; same contract as
    :func:`add_layer_norm_reference`."""
    _check_inputs(x, residual, weight, bias, eps)
    return _add_layer_norm_op(x, residual, weight, bias, eps)[0]


def add_layer_norm_reference(x, residual, weight, bias, eps):
    """PyTorch reference. x, residual: [..., N] (residual may be None); weight, bias: [N]."""
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
