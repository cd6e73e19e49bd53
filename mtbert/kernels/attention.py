"""Softmax attention over variable-length sequences, FlashAttention-2 style (Dao 2023).

Layout: packed (varlen) q, k, v, out are [T, heads, head_dim] with ``cu_seqlens`` [B + 1] int32
offsets of each sequence's tokens. One program handles one block of queries (forward, dq) or keys
(dk, dv) of one (sequence, head); the softmax is computed online in float32, so no [L, L] matrix
is stored. Saved statistics are the float32 log-sum-exp per (head, token), in base 2.

Attention dropout (as BERT's dropout on the probabilities) is generated in the kernel from a seed
with Philox (``tl.rand``), keyed by (head, query token, key position), and regenerated in the
backward kernels, so forward and backward see the same mask without storing it.

Backward (FA2, Algorithm 2), with P the softmax, Z the keep mask, s = 1/(1 - p):
    dV = (P∘Z s)ᵀ dO,  dP = (dO Vᵀ)∘Z s,  dS = P∘(dP − δ),  δ_i = Σ_d dO_id O_id,
    dQ = scale · dS K,  dK = scale · dSᵀ Q.
dQ and dK/dV come from two kernels, so nothing is accumulated with atomics.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._dropout_seed import seed_tensor
from ._triton import (FLOAT_DTYPES, attention_blocks, check_finite, check_launchable, check_tensor, dot_in_float32,
                      dot_precision, jit, tl, triton)
from .softmax_dropout import attention_cpu

_LOG2E = 1.4426950408889634
_TORCH_DTYPES = FLOAT_DTYPES + (torch.float64,)


@jit
def _sequence_bounds(cu_seqlens_ptr, batch):
    """(first token, length) of sequence ``batch``."""
    start = tl.load(cu_seqlens_ptr + batch)
    return start.to(tl.int64), tl.load(cu_seqlens_ptr + batch + 1) - start


@jit
def _keep_mask(seed, head, total_tokens, max_keys, query_tokens, key_positions, dropout_p):
    """Dropout keep mask of the (query token, key position) pairs of one tile; the counter is
    unique per (head, query token, key position), so any tile shape regenerates the same bits."""
    counters = (head * total_tokens + query_tokens) * max_keys + key_positions
    return tl.rand(seed, counters) >= dropout_p


@jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # [T, heads, HEAD_DIM], contiguous
    out_ptr,  # [T, heads, HEAD_DIM], contiguous
    lse_ptr,  # [heads, T] float32, base-2 log-sum-exp of the scaled scores
    cu_seqlens_ptr,  # [B + 1] int32
    heads, total_tokens, max_keys,
    qk_scale,  # softmax scale * log2(e)
    dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    start, seq_len = _sequence_bounds(cu_seqlens_ptr, batch)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if tl.program_id(0) * BLOCK_M >= seq_len:
        return
    token_stride = heads * HEAD_DIM
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    q_offsets = (start + rows)[:, None] * token_stride + head * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for key_start in range(0, seq_len, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < seq_len
        k_t = tl.load(k_ptr + (start + keys)[None, :] * token_stride + head * HEAD_DIM + dims[:, None],
                      mask=key_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        v = tl.load(v_ptr + (start + keys)[:, None] * token_stride + head * HEAD_DIM + dims[None, :],
                    mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        if DOT_FP32:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.where(key_ok[None, :], tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        probs = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)  # the normaliser counts dropped entries too
        if HAS_DROPOUT:
            keep = _keep_mask(seed, head, total_tokens, max_keys, (start + rows)[:, None], keys[None, :], dropout_p)
            probs = tl.where(keep, probs, 0.0)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    out = acc / row_sum[:, None]  # >= 1: the sequence has a key, and its largest score adds exp2(0)
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    lse = row_max + tl.log2(row_sum)
    tl.store(lse_ptr + head * total_tokens + start + rows, lse, mask=row_ok)


@jit
def _attention_bwd_delta_kernel(
    out_ptr, grad_out_ptr,  # [T, heads, HEAD_DIM], contiguous
    delta_ptr,  # [heads, T] float32: Σ_d dO ∘ O
    total_tokens, heads,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    offsets = (tokens[:, None] * heads + head) * HEAD_DIM + dims[None, :]
    inside = tokens[:, None] < total_tokens
    out = tl.load(out_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    grad_out = tl.load(grad_out_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(delta_ptr + head * total_tokens + tokens, tl.sum(out * grad_out, axis=1), mask=tokens < total_tokens)


@jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr,  # [T, heads, HEAD_DIM], contiguous
    lse_ptr, delta_ptr,  # [heads, T] float32
    grad_k_ptr, grad_v_ptr,  # [T, heads, HEAD_DIM], contiguous
    cu_seqlens_ptr,  # [B + 1] int32
    heads, total_tokens, max_keys,
    softmax_scale, qk_scale, dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    start, seq_len = _sequence_bounds(cu_seqlens_ptr, batch)
    if tl.program_id(0) * BLOCK_N >= seq_len:
        return
    token_stride = heads * HEAD_DIM
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    key_ok = keys < seq_len
    kv_offsets = (start + keys)[:, None] * token_stride + head * HEAD_DIM + dims[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(v_ptr + kv_offsets, mask=key_ok[:, None], other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    grad_k = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    grad_v = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for query_start in range(0, seq_len, BLOCK_M):
        rows = query_start + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_len
        q_t = tl.load(q_ptr + (start + rows)[None, :] * token_stride + head * HEAD_DIM + dims[:, None],
                      mask=row_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_M)
        grad_out = tl.load(grad_out_ptr + (start + rows)[:, None] * token_stride + head * HEAD_DIM
                           + dims[None, :], mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
        if DOT_FP32:
            q_t = q_t.to(tl.float32)
            grad_out = grad_out.to(tl.float32)
        lse = tl.load(lse_ptr + head * total_tokens + start + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + head * total_tokens + start + rows, mask=row_ok, other=0.0)
        valid = key_ok[:, None] & row_ok[None, :]
        probs_t = tl.where(valid, tl.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse[None, :]), 0.0)  # (BLOCK_N, BLOCK_M)
        grad_probs_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep_t = _keep_mask(seed, head, total_tokens, max_keys, (start + rows)[None, :], keys[:, None],
                                dropout_p)
            kept_scale = 1.0 / (1.0 - dropout_p)
            grad_v += tl.dot(tl.where(keep_t, probs_t * kept_scale, 0.0).to(grad_out.dtype), grad_out, input_precision=DOT_PRECISION)
            grad_probs_t = tl.where(keep_t, grad_probs_t * kept_scale, 0.0)
        else:
            grad_v += tl.dot(probs_t.to(grad_out.dtype), grad_out, input_precision=DOT_PRECISION)
        grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
        grad_k += tl.dot(grad_scores_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    write_ok = key_ok[:, None]
    tl.store(grad_k_ptr + kv_offsets, (grad_k * softmax_scale).to(grad_k_ptr.dtype.element_ty), mask=write_ok)
    tl.store(grad_v_ptr + kv_offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=write_ok)


@jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr,  # [T, heads, HEAD_DIM], contiguous
    lse_ptr, delta_ptr,  # [heads, T] float32
    grad_q_ptr,  # [T, heads, HEAD_DIM], contiguous
    cu_seqlens_ptr,  # [B + 1] int32
    heads, total_tokens, max_keys,
    softmax_scale, qk_scale, dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    start, seq_len = _sequence_bounds(cu_seqlens_ptr, batch)
    if tl.program_id(0) * BLOCK_M >= seq_len:
        return
    token_stride = heads * HEAD_DIM
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    q_offsets = (start + rows)[:, None] * token_stride + head * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None], other=0.0)
    grad_out = tl.load(grad_out_ptr + q_offsets, mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        grad_out = grad_out.to(tl.float32)
    lse = tl.load(lse_ptr + head * total_tokens + start + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + head * total_tokens + start + rows, mask=row_ok, other=0.0)
    grad_q = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for key_start in range(0, seq_len, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < seq_len
        kv_t_offsets = (start + keys)[None, :] * token_stride + head * HEAD_DIM + dims[:, None]
        k_t = tl.load(k_ptr + kv_t_offsets, mask=key_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        v_t = tl.load(v_ptr + kv_t_offsets, mask=key_ok[None, :], other=0.0)
        if DOT_FP32:
            k_t = k_t.to(tl.float32)
            v_t = v_t.to(tl.float32)
        valid = row_ok[:, None] & key_ok[None, :]
        probs = tl.where(valid, tl.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        grad_probs = tl.dot(grad_out, v_t, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, head, total_tokens, max_keys, (start + rows)[:, None], keys[None, :], dropout_p)
            grad_probs = tl.where(keep, grad_probs * (1.0 / (1.0 - dropout_p)), 0.0)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_q += tl.dot(grad_scores.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    tl.store(grad_q_ptr + q_offsets, (grad_q * softmax_scale).to(grad_q_ptr.dtype.element_ty), mask=row_ok[:, None])


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, dtypes=FLOAT_DTYPES, contiguous=True):
    """Raises ValueError naming the first bad argument. Reads only shapes, dtypes and devices, so it
    also runs while torch.compile traces (max_seqlen may then be a symbolic int)."""
    check_tensor("q", q, dims=3, dtypes=dtypes, contiguous=contiguous)
    check_tensor("k", k, dtypes=(q.dtype,), like=q, shape=q.shape, contiguous=contiguous)
    check_tensor("v", v, dtypes=(q.dtype,), like=q, shape=q.shape, contiguous=contiguous)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    check_tensor("cu_seqlens", cu_seqlens, dims=1, dtypes=(torch.int32,), like=q)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets, got {cu_seqlens.numel()}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")


def kernel_settings(dtype: torch.dtype, head_dim: int, dropout: bool) -> dict:
    """The constexprs and launch options of the forward, dK/dV and dQ kernels for one input dtype,
    head size and dropout setting: what the launchers below pass, and what the compile gate
    (mtbert.kernels.compile_check) compiles for each GPU target."""
    BLOCK_M, BLOCK_N, num_warps, num_stages = attention_blocks(head_dim, dtype)
    return dict(HAS_DROPOUT=dropout, DOT_FP32=dot_in_float32(dtype), DOT_PRECISION=dot_precision(dtype),
                HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages)


def attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, dropout_p=0.0, seed=0):
    """softmax(q kᵀ · scale) v per (sequence, head), dropout on the probabilities.

    q, k, v [T, heads, head_dim] with cu_seqlens [B + 1] int32 and max_seqlen (an int bounding
    every length); float32/float16/bfloat16, contiguous; head_dim 16/32/64/128; scale defaults to
    head_dim^-1/2. Returns out (q's layout and dtype) and lse [heads, T] float32 (base 2).
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    check_launchable("q", q)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_finite(name, tensor)
    total_tokens, heads, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    settings = kernel_settings(q.dtype, head_dim, dropout_p > 0)
    out = torch.empty_like(q)
    lse = torch.empty(heads, total_tokens, dtype=torch.float32, device=q.device)
    _attention_fwd_kernel[(triton.cdiv(max_seqlen, settings["BLOCK_M"]), cu_seqlens.numel() - 1, heads)](
        q, k, v, out, lse, cu_seqlens, heads, total_tokens, max_seqlen, scale * _LOG2E, dropout_p, seed, **settings)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale=None, dropout_p=0.0,
                       seed=0):
    """Gradients (dq, dk, dv) of :func:`attention_forward`, given its out and lse and the same
    cu_seqlens, max_seqlen, scale, dropout_p and seed."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    check_tensor("grad_out", grad_out, dtypes=None, like=q, shape=q.shape)
    total_tokens, heads, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    settings = kernel_settings(q.dtype, head_dim, dropout_p > 0)
    grad_out = grad_out.to(q.dtype)
    delta = torch.empty(heads, total_tokens, dtype=torch.float32, device=q.device)
    _attention_bwd_delta_kernel[(triton.cdiv(total_tokens, settings["BLOCK_M"]), heads)](
        out, grad_out, delta, total_tokens, heads, HEAD_DIM=head_dim, BLOCK_M=settings["BLOCK_M"])
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    batch = cu_seqlens.numel() - 1
    scalars = (heads, total_tokens, max_seqlen, scale, scale * _LOG2E, dropout_p, seed)
    _attention_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, settings["BLOCK_N"]), batch, heads)](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, cu_seqlens, *scalars, **settings)
    _attention_bwd_dq_kernel[(triton.cdiv(max_seqlen, settings["BLOCK_M"]), batch, heads)](
        q, k, v, grad_out, lse, delta, grad_q, cu_seqlens, *scalars, **settings)
    return grad_q, grad_k, grad_v


# The kernels as PyTorch custom ops, so that torch.compile(fullgraph=True) traces through them
# (each is one opaque node; the fake implementations give the output shapes). The dropout seed is a
# CPU int64 tensor drawn outside the op: the op stays a pure function of its inputs, and the
# backward reads the forward's seed from the saved tensors.
@torch.library.custom_op("mtbert::varlen_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                  softmax_scale: float, dropout_p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, int(seed))


@_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("mtbert::varlen_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                           softmax_scale: float, dropout_p: float,
                           seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, dropout_p,
                              int(seed))


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens, seed)
    ctx.settings = (max_seqlen, softmax_scale, dropout_p)


def _attention_backward(ctx, grad_out, grad_lse):  # lse is an internal output: its gradient is unused
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    grads = _attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, *ctx.settings, seed)
    return (*grads, None, None, None, None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, seed=None):
    """Packed attention with autograd (Triton, as the custom op mtbert::varlen_attention). See
    :func:`attention_forward`; ``seed`` (an int) fixes the dropout mask."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _attention_op(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed_tensor(seed, dropout_p))[0]


def varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                           fused_softmax_dropout=False):
    """Packed attention in PyTorch, the CPU path under autocast (and everywhere with
    ``MTBERT_KERNELS=torch`` or without the extension; float32 runs the C++ op of
    :mod:`varlen_attention_cpu`): the packed q, k, v are padded to [B, max_seqlen]
    for attention only, and the real rows gathered back. On 2 CPU cores (MiniLM shapes, see
    benchmarks/README.md) this was as fast as one SDPA call per length bucket on a quiet machine
    and faster in the whole training step; SDPA on nested tensors was several times slower.

    Runs of sequences of very different lengths (a packed batch of several length-bucketed
    batches) are padded run by run (see :func:`padding_groups`), not all to the longest.

    Without dropout it is ``scaled_dot_product_attention`` with a key mask; with dropout, the plain
    matmul-softmax-dropout-matmul, i.e. Hugging Face's eager attention, whose dropout draws the
    same random numbers in the same order (within one run). With ``fused_softmax_dropout`` (float32
    only), the softmax and dropout between the two matmuls are the extension's fused CPU op instead
    (:mod:`softmax_dropout`; its own random stream)."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, _TORCH_DTYPES, contiguous=False)
    attend = functools.partial(_padded_varlen_attention, fused_softmax_dropout=fused_softmax_dropout)
    if torch.compiler.is_compiling():  # the runs depend on the lengths' values: one run in a graph
        return attend(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    lengths = cu_seqlens.diff().tolist()
    groups = padding_groups(tuple(lengths))
    if len(groups) == 1:
        return attend(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    bounds = cu_seqlens.tolist()
    sizes = [bounds[end] - bounds[begin] for begin, end in groups]
    pieces = zip(groups, q.split(sizes), k.split(sizes), v.split(sizes))  # split's backward is one cat
    return torch.cat([
        attend(q_g, k_g, v_g, cu_seqlens[begin:end + 1] - bounds[begin], max(lengths[begin:end]), dropout_p,
               softmax_scale)
        for (begin, end), q_g, k_g, v_g in pieces])


# What one more padding run costs, in padded (query, key) positions: its own dozen op calls
# (about 0.3 ms on 2 CPU cores, the attention work of a few thousand positions), taken generously.
_RUN_OVERHEAD = 16384
# Longest run tried, in sequences: bounds the search; longer runs gain nothing measurable.
_MAX_RUN = 256


@functools.lru_cache(maxsize=64)
def padding_groups(lengths: tuple) -> tuple:
    """Runs (begin, end) of consecutive sequences to pad together, minimising the padded attention
    work Σ_runs (sequences · longest²) plus a fixed cost per run (dynamic programming over runs of
    at most _MAX_RUN sequences, pruned: runs costing more than the best so far are not tried).
    Cached: every layer sees the same lengths."""
    best, start = [0] + [None] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        longest = 0
        for begin in range(end - 1, max(end - _MAX_RUN, 0) - 1, -1):
            longest = max(longest, lengths[begin])
            run = (end - begin) * longest * longest + _RUN_OVERHEAD
            if best[end] is not None and run >= best[end]:
                break  # longer runs only cost more
            if best[end] is None or best[begin] + run < best[end]:
                best[end], start[end] = best[begin] + run, begin
    groups, end = [], len(lengths)
    while end > 0:
        groups.append((start[end], end))
        end = start[end]
    return tuple(reversed(groups))


def _padded_varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, fused_softmax_dropout):
    T, heads, head_dim = q.shape
    B = cu_seqlens.numel() - 1
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    lengths = cu_seqlens.diff()
    key_ok = torch.arange(max_seqlen, device=q.device) < lengths[:, None]  # (B, max_seqlen)
    rows, positions = key_ok.nonzero(as_tuple=True)  # (T,) each: the padded place of each packed token

    def padded(t):  # (B, heads, max_seqlen, head_dim)
        return t.new_zeros(B, max_seqlen, heads, head_dim).index_put_((rows, positions), t).transpose(1, 2)

    q_p, k_p, v_p = padded(q), padded(k), padded(v)
    if dropout_p > 0:
        mask_bias = torch.zeros(key_ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_ok, torch.finfo(q.dtype).min)
        if fused_softmax_dropout:
            context = attention_cpu(q_p, k_p, v_p, mask_bias, dropout_p, scale)
        else:
            scores = q_p @ k_p.transpose(-1, -2) * scale + mask_bias[:, None, None, :]  # (B, heads, L, L)
            context = F.dropout(torch.softmax(scores, dim=-1), dropout_p) @ v_p
    else:
        context = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=key_ok[:, None, None, :], scale=scale)
    return context.transpose(1, 2)[rows, positions]  # (T, heads, head_dim)


def attention_reference(q, k, v, cu_seqlens, softmax_scale=None, keep_mask=None, dropout_p=0.0):
    """Plain PyTorch reference: per packed sequence, softmax(q kᵀ · scale), times
    ``keep_mask / (1 - dropout_p)`` when a keep mask [heads, len, len] per sequence (a list) is
    given, times v."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    bounds = cu_seqlens.tolist()
    outputs = []
    for index, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        q_h, k_h, v_h = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (heads, len, head_dim)
        probs = torch.softmax(q_h @ k_h.transpose(-1, -2) * scale, dim=-1)  # (heads, len, len)
        if keep_mask is not None:
            probs = probs * keep_mask[index] / (1.0 - dropout_p)
        outputs.append((probs @ v_h).transpose(0, 1))
    return torch.cat(outputs)
