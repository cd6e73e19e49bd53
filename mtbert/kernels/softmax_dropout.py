"""Attention's softmax and dropout in one pass on the CPU: dropout(softmax(scores · scale + mask)).

With dropout, PyTorch's CPU attention (``scaled_dot_product_attention``'s math path, or Hugging
Face's eager attention) runs five passes over the [B, heads, L, L] scores: scale, add the mask,
softmax, a bernoulli draw (one Mersenne-Twister number per probability, the costliest of them),
multiply. The C++ op ``mtbert::softmax_dropout`` (csrc/softmax_dropout.cpp) does them in one,
drawing the keep mask from Philox4x32-10 seeded from torch's CPU generator; the backward reads the
probabilities and the mask the forward returned. :func:`attention_cpu` puts it between the two
batched matmuls. Scores may be bfloat16 (the first matmul under CPU autocast): the kernel computes in
float32 and stores the probabilities in bfloat16, as the second matmul reads them.
"""
import torch
import torch.nn.functional as F

from .. import _extension
from ._dropout_seed import seed_tensor
from ._triton import check_tensor

_DTYPES = (torch.float32, torch.bfloat16)


def _fake_forward(scores, mask_bias, scale, dropout_p, seed):
    keep = scores.new_empty(scores.shape if dropout_p > 0 else (0,), dtype=torch.uint8)
    return torch.empty_like(scores), torch.empty_like(scores), keep


def _fake_backward(grad_out, probs, keep, scale, dropout_p):
    return torch.empty_like(probs)


def _setup_context(ctx, inputs, output):
    scores, mask_bias, scale, dropout_p, seed = inputs
    _, probs, keep = output
    ctx.save_for_backward(probs, keep)
    ctx.settings = scale, dropout_p


def _backward(ctx, grad_out, grad_probs, grad_keep):  # only the output is differentiated
    probs, keep = ctx.saved_tensors
    return (torch.ops.mtbert.softmax_dropout_backward(grad_out.contiguous(), probs, keep, *ctx.settings),
            None, None, None, None)


if _extension.available():  # the ops are defined by the extension; without it the reference runs
    torch.library.register_fake("mtbert::softmax_dropout", _fake_forward)
    torch.library.register_fake("mtbert::softmax_dropout_backward", _fake_backward)
    torch.library.register_autograd("mtbert::softmax_dropout", _backward, setup_context=_setup_context)


def softmax_dropout_cpu(scores, mask_bias, scale, dropout_p, seed=None):
    """dropout(softmax(scores · scale + mask_bias)) over the last dimension, with autograd.
    scores: [B, heads, Lq, Lk] float32 or bfloat16 on the CPU; mask_bias: [B, Lk] float32 or
    bfloat16, additive (0 to attend, a large negative to skip) or None; ``seed`` (an int) fixes the
    mask, None draws it from torch's generator. Returns (output, probabilities before dropout, keep
    mask uint8, empty without dropout); the first two of scores' dtype."""
    check_tensor("scores", scores, dims=4, dtypes=_DTYPES, contiguous=False)
    if scores.device.type != "cpu" or scores.shape[-1] == 0:
        raise ValueError(f"scores must be a CPU tensor with at least one key, got shape {tuple(scores.shape)} "
                         f"on {scores.device}")
    if mask_bias is None:
        mask_bias = scores.new_zeros(scores.shape[0], scores.shape[-1])
    check_tensor("mask_bias", mask_bias, dtypes=_DTYPES, like=scores, shape=(scores.shape[0], scores.shape[-1]),
                 contiguous=False)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    _extension.ops()  # a clear error when the extension is not built
    # A bfloat16 mask holds float32 values exactly (its bits are a float32's upper half).
    return torch.ops.mtbert.softmax_dropout(scores.contiguous(), mask_bias.float().contiguous(), float(scale), dropout_p,
                                            seed_tensor(seed, dropout_p))


def attention_cpu(q, k, v, mask_bias, dropout_p, scale):
    """softmax(q kᵀ · scale + mask_bias) with dropout, times v. q, k, v: [B, heads, L, head_dim]
    float32 or bfloat16 (views are fine; under autocast the matmuls run in bfloat16); mask_bias:
    [B, L] additive or None. Returns [B, heads, L, head_dim]."""
    scores = q @ k.transpose(-1, -2)  # (B, heads, L, L)
    return softmax_dropout_cpu(scores, mask_bias, scale, dropout_p)[0] @ v


def softmax_dropout_reference(scores, mask_bias, scale, dropout_p, keep=None):
    """PyTorch reference: with ``keep`` (of scores' shape) that mask scaled by 1 / (1 - dropout_p);
    without it, ``F.dropout``'s own mask."""
    if mask_bias is not None:
        scores = scores * scale + mask_bias[:, None, None, :]
    else:
        scores = scores * scale
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        return probs * (keep.to(probs.dtype) / (1.0 - dropout_p))
    return F.dropout(probs, dropout_p) if dropout_p > 0 else probs
