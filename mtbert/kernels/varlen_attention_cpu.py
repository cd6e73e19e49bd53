"""Attention over packed variable-length sequences on the CPU, straight from the packed q, k, v.

The C++ op ``mtbert::varlen_attention_cpu`` (csrc/varlen_attention.cpp) runs each (sequence, head)
as two BLAS products around a fused softmax and dropout, in parallel over the pairs, reading the
[T, heads, head_dim] q, k, v in place (also the strided views of one fused QKV projection). The
PyTorch path it replaces (:func:`attention.varlen_attention_torch`) pads q, k, v to
[B, heads, L, head_dim] for batched matmuls and gathers the result back: zero-fills, index_put_,
index, transposing copies and cat, about 5% of the packed multitask step in a two-thread profile.
The probabilities (float32, one [L, L] block per (sequence, head)) and the dropout mask are saved
for the backward. The mask is Philox, seeded from torch's generator, as ``softmax_dropout``'s: with
equal lengths it is the padded path's mask. Float32 only: under CPU autocast (bfloat16 q, k, v) the
dispatcher keeps the PyTorch path.
"""
import torch

from .. import _extension
from ._dropout_seed import seed_tensor
from ._triton import check_finite
from .attention import _check_inputs


def _fake_forward(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    blocks = torch.library.get_ctx().new_dynamic_size()  # heads · Σ L², read from cu_seqlens' values
    keep = q.new_empty(blocks if dropout_p > 0 else 0, dtype=torch.uint8)
    return q.new_empty(q.shape), q.new_empty(blocks), keep


def _fake_backward(grad_out, q, k, v, probs, keep, cu_seqlens, max_seqlen, scale, dropout_p):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
    _, probs, keep = output
    ctx.save_for_backward(q, k, v, probs, keep, cu_seqlens)
    ctx.settings = max_seqlen, scale, dropout_p
    ctx.set_materialize_grads(False)  # probs and keep get no gradient: no zero-filled stand-ins for them


def _backward(ctx, grad_out, grad_probs, grad_keep):  # only the output is differentiated
    if grad_out is None:
        return None, None, None, None, None, None, None, None
    q, k, v, probs, keep, cu_seqlens = ctx.saved_tensors
    grads = torch.ops.mtbert.varlen_attention_cpu_backward(_packed_layout(grad_out), q, k, v, probs, keep, cu_seqlens,
                                                           *ctx.settings)
    return (*grads, None, None, None, None, None)


if _extension.available():  # the ops are defined by the extension; without it the PyTorch path runs
    torch.library.register_fake("mtbert::varlen_attention_cpu", _fake_forward)
    torch.library.register_fake("mtbert::varlen_attention_cpu_backward", _fake_backward)
    torch.library.register_autograd("mtbert::varlen_attention_cpu", _backward, setup_context=_setup_context)


def _packed_layout(t):
    """``t`` itself when the op reads it in place (unit stride over head_dim, heads and tokens not
    overlapping: e.g. the views of a fused [T, 3, heads, head_dim] projection), else a contiguous copy."""
    T, heads, head_dim = t.shape
    if t.stride(2) == 1 and t.stride(1) >= head_dim and t.stride(0) >= heads * t.stride(1):
        return t
    return t.contiguous()


def varlen_attention_cpu(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, seed=None):
    """Packed attention with autograd on the CPU (float32). q, k, v: [T, heads, head_dim];
    cu_seqlens: [B + 1] int32 offsets; max_seqlen: an int >= every length; ``seed`` (an int) fixes
    the dropout mask, None draws it from torch's generator. Returns [T, heads, head_dim]."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, dtypes=(torch.float32,),
                  contiguous=False)
    if not torch.compiler.is_compiling():  # anomaly mode is read eagerly only
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            check_finite(name, tensor)
    _extension.ops()  # a clear error when the extension is not built
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.ops.mtbert.varlen_attention_cpu(_packed_layout(q), _packed_layout(k), _packed_layout(v), cu_seqlens,
                                                 max_seqlen, float(scale), float(dropout_p),
                                                 seed_tensor(seed, dropout_p))[0]
