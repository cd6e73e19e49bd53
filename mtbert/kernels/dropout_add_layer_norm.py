"""Dropout, residual add and LayerNorm in one pass on the CPU: y = LN(dropout(x) + residual).

BERT applies this after the attention output and after the FFN. PyTorch runs it as a bernoulli
draw, a multiply, an add and a LayerNorm (four passes over the rows, and the bernoulli draw, one
Mersenne-Twister number per element, costs more than the other three together on the CPU). The C++
op ``mtbert::dropout_add_layer_norm`` (csrc/dropout_add_layer_norm.cpp) draws the keep mask from a
counter-based generator (Philox4x32-10) in the same pass; the backward reads the mask the forward
returned, so both use the same one. Its seed is drawn from torch's CPU generator, so
``torch.manual_seed`` makes runs reproducible (the masks differ from ``F.dropout``'s).

The backward op returns the weight and bias gradients summed over row ranges, [K, N]: one range
here, one per segment in ``segmented.dropout_add_layer_norm``.

x may be bfloat16 (a linear layer's output under CPU autocast) beside the float32 residual; the
kernel computes in float32 and returns y float32 (autocast's type promotion of the add), x's
gradient in bfloat16.
"""
import torch
import torch.nn.functional as F

from .. import _extension
from ._dropout_seed import seed_tensor
from ._triton import check_tensor


def _check_inputs(x, residual, weight, bias, eps, dropout_p):
    check_tensor("x", x, dtypes=(torch.float32, torch.bfloat16), contiguous=False)
    N = x.shape[-1] if x.dim() else 0
    if N == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor (this is the CPU op), got {x.device}")
    check_tensor("residual", residual, dtypes=(torch.float32,), like=x, shape=x.shape, contiguous=False)
    check_tensor("weight", weight, dtypes=(torch.float32,), like=x, shape=(N,))
    check_tensor("bias", bias, dtypes=(torch.float32,), like=x, shape=(N,))
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def rows(t):
    """t [..., N] as contiguous rows [M, N] (a view when it already is)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _fake_forward(x, residual, weight, bias, eps, dropout_p, seed):
    M, N = x.shape
    keep = x.new_empty((M, N) if dropout_p > 0 else (0, 0), dtype=torch.uint8)
    return (torch.empty_like(residual), torch.empty_like(residual), residual.new_empty(M), residual.new_empty(M),
            keep)


def _fake_backward(grad_y, z, keep, weight, mean, rstd, dropout_p, row_bounds, x_dtype=None):
    K, N = max(len(row_bounds) - 1, 1), z.shape[1]
    return (torch.empty_like(z, dtype=x_dtype or torch.float32), torch.empty_like(z), z.new_empty(K, N),
            z.new_empty(K, N))


def forward_op(x, residual, weight, bias, eps, dropout_p, seed=None):
    """The op on rows: returns y, z (= dropout(x) + residual), mean, rstd [M] and the keep mask
    (uint8 [M, N], empty without dropout). ``seed`` (an int) fixes the mask; None draws it from
    torch's generator."""
    return torch.ops.mtbert.dropout_add_layer_norm(rows(x), rows(residual), weight, bias, eps, dropout_p,
                                                   seed_tensor(seed, dropout_p))


def backward_op(grad_y, z, keep, weight, mean, rstd, dropout_p, row_bounds, x_dtype=torch.float32):
    """grad_x [M, N] (of ``x_dtype``), grad_residual [M, N] and the weight and bias gradients [K, N]
    of the K row ranges [row_bounds[k], row_bounds[k + 1]); ``row_bounds=[]``: one range, all rows."""
    return torch.ops.mtbert.dropout_add_layer_norm_backward(rows(grad_y), z, keep, weight, mean, rstd, dropout_p,
                                                            list(row_bounds), x_dtype)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed = inputs
    _, z, mean, rstd, keep = output
    ctx.save_for_backward(z, keep, weight, mean, rstd)
    ctx.dropout_p, ctx.x_dtype = dropout_p, x.dtype


def _backward(ctx, grad_y, grad_z, grad_mean, grad_rstd, grad_keep):  # only y is differentiated
    z, keep, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_residual, grad_weight, grad_bias = backward_op(grad_y, z, keep, weight, mean, rstd, ctx.dropout_p, [],
                                                                ctx.x_dtype)
    return grad_x, grad_residual, grad_weight[0], grad_bias[0], None, None, None


if _extension.available():  # the ops are defined by the extension; without it the reference runs
    torch.library.register_fake("mtbert::dropout_add_layer_norm", _fake_forward)
    torch.library.register_fake("mtbert::dropout_add_layer_norm_backward", _fake_backward)
    torch.library.register_autograd("mtbert::dropout_add_layer_norm", _backward, setup_context=_setup_context)


def dropout_add_layer_norm_cpu(x, residual, weight, bias, eps, dropout_p, seed=None):
    """LN(dropout(x) + residual) with the C++ op, with autograd. x: [..., N] float32 or bfloat16 on
    the CPU; residual: [..., N] float32; weight, bias: [N] float32; ``dropout_p`` in [0, 1) (0 in
    eval mode); ``seed`` as in :func:`forward_op`. Returns float32."""
    _check_inputs(x, residual, weight, bias, eps, dropout_p)
    _extension.ops()  # a clear error when the extension is not built
    return forward_op(x, residual, weight, bias, eps, dropout_p, seed)[0].view(x.shape)


def dropout_add_layer_norm_reference(x, residual, weight, bias, eps, dropout_p, keep=None):
    """PyTorch reference: with ``keep`` (a bool/0-1 tensor of x's shape) that mask, scaled by
    1 / (1 - dropout_p), as torch's dropout does; without it, ``F.dropout``'s own mask."""
    if keep is not None:
        x = x * (keep.to(x.dtype) / (1.0 - dropout_p))
    elif dropout_p > 0:
        x = F.dropout(x, dropout_p)
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)
