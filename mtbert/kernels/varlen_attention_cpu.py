"""Attention over packed variable-length sequences on the CPU, straight from the packed q, k, v.

The C++ op ``mtbert::varlen_attention_cpu`` (csrc/varlen_attention.cpp) runs each (sequence, head)
as two BLAS products around a fused softmax and dropout, in parallel over the pairs, reading q, k,
v in place from the fused QKV projection [T, 3, heads, head_dim] and writing their gradient into
one tensor of that shape. The PyTorch path it replaces (:func:`attention.varlen_attention_torch`)
pads q, k, v to [B, heads, L, head_dim] for batched matmuls and gathers the result back: zero-fills,
index_put_, index, transposing copies and cat, about 5% of the packed multitask step in a
two-thread profile.
The probabilities (float32, one [L, L] block per (sequence, head)) and the dropout mask are saved
for the backward. The mask is Philox, seeded from torch's generator, as ``softmax_dropout``'s: with
equal lengths it is the padded path's mask. Float32 only: under CPU autocast (bfloat16 q, k, v) the
dispatcher keeps the PyTorch path.
"""
import torch

from .. import _extension
from ._dropout_seed import seed_tensor
from ._triton import check_finite, check_tensor
from .attention import _check_inputs


def _fake_forward(qkv, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    T, _, heads, head_dim = qkv.shape
    blocks = torch.library.get_ctx().new_dynamic_size()  # heads · Σ L², read from cu_seqlens' values
    keep = qkv.new_empty(blocks if dropout_p > 0 else 0, dtype=torch.uint8)
    return qkv.new_empty(T, heads, head_dim), qkv.new_empty(blocks), keep


def _fake_backward(grad_out, qkv, probs, keep, cu_seqlens, max_seqlen, scale, dropout_p):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
    _, probs, keep = output
    ctx.save_for_backward(qkv, probs, keep, cu_seqlens)
    ctx.settings = max_seqlen, scale, dropout_p
    ctx.set_materialize_grads(False)  # probs and keep get no gradient: no zero-filled stand-ins for them


def _backward(ctx, grad_out, grad_probs, grad_keep):  # only the output is differentiated
    if grad_out is None:
        return None, None, None, None, None, None
    qkv, probs, keep, cu_seqlens = ctx.saved_tensors
    grad_qkv = torch.ops.mtbert.varlen_attention_cpu_backward(_readable(grad_out), qkv, probs, keep, cu_seqlens,
                                                              *ctx.settings)
    return grad_qkv, None, None, None, None, None


if _extension.available():  # the ops are defined by the extension; without it the PyTorch path runs
    torch.library.register_fake("mtbert::varlen_attention_cpu", _fake_forward)
    torch.library.register_fake("mtbert::varlen_attention_cpu_backward", _fake_backward)
    torch.library.register_autograd("mtbert::varlen_attention_cpu", _backward, setup_context=_setup_context)


def _readable(t):
    """``t`` [..., heads, head_dim] itself when the op reads it in place (unit stride over head_dim,
    heads and tokens not overlapping: e.g. a fused [T, 3 · heads · head_dim] projection's view), else
    a contiguous copy."""
    heads, head_dim = t.shape[-2:]
    if t.stride(-1) == 1 and t.stride(-2) >= head_dim and t.stride(0) >= heads * t.stride(-2):
        return t
    return t.contiguous()


def varlen_attention_qkv_cpu(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, seed=None):
    """Packed attention with autograd on the CPU (float32) from the fused projection. qkv:
    [T, 3, heads, head_dim] (query, key, value); cu_seqlens: [B + 1] int32 offsets; max_seqlen: an
    int >= every length; ``seed`` (an int) fixes the dropout mask, None draws it from torch's
    generator. Returns [T, heads, head_dim]; qkv's gradient is one [T, 3, heads, head_dim] tensor."""
    check_tensor("qkv", qkv, dims=4, dtypes=(torch.float32,), contiguous=False)
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape [T, 3, heads, head_dim], got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, dtypes=(torch.float32,),
                  contiguous=False)
    if not torch.compiler.is_compiling():  # anomaly mode is read eagerly only
        check_finite("qkv", qkv)
    _extension.ops()  # a clear error when the extension is not built
    scale = softmax_scale if softmax_scale is not None else qkv.shape[-1] ** -0.5
    return torch.ops.mtbert.varlen_attention_cpu(_readable(qkv), cu_seqlens, max_seqlen, float(scale),
                                                 float(dropout_p), seed_tensor(seed, dropout_p))[0]


def varlen_attention_cpu(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, seed=None):
    """:func:`varlen_attention_qkv_cpu` for separate q, k, v [T, heads, head_dim] (stacked first:
    one copy)."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, dtypes=(torch.float32,),
                  contiguous=False)
    return varlen_attention_qkv_cpu(torch.stack([q, k, v], dim=1), cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                    seed)
