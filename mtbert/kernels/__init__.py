"""The single dispatch point of the encoder's hot ops.

Model code calls only the functions below; which implementation runs is decided here and nowhere
else: the Triton kernels on CUDA tensors when Triton is installed, the PyTorch path otherwise
(and for bfloat16 on GPUs older than compute capability 8.0, which the kernels cannot serve).
On the CPU, in float32 and in bfloat16 (CPU autocast: float32 weights, bfloat16 matmul outputs), the
ops with dropout run the fused C++ kernels of the extension (``dropout_add_layer_norm``,
``attention``'s softmax and dropout) when it is built, and in float32 ``varlen_attention`` runs
the extension's packed CPU attention (``varlen_attention_cpu``).
The environment variable ``MTBERT_KERNELS`` (read at each call) forces one: ``torch`` always runs
PyTorch (and ``F.dropout``, whose random stream Hugging Face's models share); ``triton`` always runs Triton, which on CPU tensors needs ``TRITON_INTERPRET=1`` set
before mtbert is imported (Triton's interpreter, how the tests run the kernels without a GPU).
Triton itself is optional: without it everything runs in PyTorch. The Triton ops are PyTorch
custom ops (``torch.ops.mtbert.*``, registered in each op module), so torch.compile traces them
as single nodes; ``python -m mtbert.kernels.compile_check`` compiles them for GPU targets.

Inside ``with GradientSegments(attention_mask, offsets, destinations):`` (see ``segmented``), the
ops of parameters that require grad take their segmented form: one forward and one backward for
the whole batch, each segment's parameter gradients written into its own destination.
"""
import os

import torch
import torch.nn.functional as F

from .. import _extension
from . import attention as _attention
from . import bias_gelu as _bias_gelu
from . import dropout_add_layer_norm as _dropout_add_layer_norm
from . import layer_norm as _layer_norm
from . import softmax_dropout as _softmax_dropout
from . import varlen_attention_cpu as _varlen_attention_cpu
from . import segmented as _segmented
from ._triton import can_launch, gpu_unsupported_reason, triton_available
from .segmented import GradientSegments

__all__ = ["add_layer_norm", "dropout_add_layer_norm", "bias_gelu", "linear_bias_gelu", "linear", "embedding", "attention",
           "varlen_attention", "varlen_attention_qkv", "GradientSegments", "use_triton", "use_cpu_kernels", "triton_available"]

_CHOICES = ("torch", "triton", "auto")


def _choice() -> str:
    choice = os.environ.get("MTBERT_KERNELS", "auto").lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"MTBERT_KERNELS must be one of {_CHOICES}, got {choice!r}")
    return choice


def use_triton(tensor) -> bool:
    """Whether the ops run their Triton kernels for ``tensor`` (see the module docstring)."""
    choice = _choice()
    if choice == "torch":
        return False
    if choice == "triton":
        return True  # the op raises a clear error if the kernel cannot run here
    # e.g. bfloat16 on a pre-Ampere GPU falls back to PyTorch
    return tensor.is_cuda and can_launch(tensor) and gpu_unsupported_reason(tensor) is None


_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def use_cpu_kernels(tensor) -> bool:
    """Whether the ops run the extension's fused CPU kernels for ``tensor``: float32 or bfloat16
    (what CPU autocast makes of a matmul) on the CPU, the extension built, ``MTBERT_KERNELS`` unset
    or ``auto``. The kernels compute in float32 whatever the storage."""
    return (_choice() == "auto" and tensor.device.type == "cpu" and tensor.dtype in _CPU_KERNEL_DTYPES
            and _extension.available())


def _segments_for(*params):
    """The active GradientSegments when one of ``params`` will need a gradient, else None. Eager
    only: torch.compile cannot trace the ContextVar that holds them, so compiled graphs run the
    plain ops."""
    if torch.compiler.is_compiling():
        return None
    segments = _segmented.current()
    if segments is None or not torch.is_grad_enabled():
        return None
    return segments if any(p is not None and p.requires_grad for p in params) else None


def linear(x, weight, bias=None):
    """y = x Wᵀ + b. x: [..., in]; weight: [out, in]; bias: [out] or None."""
    segments = _segments_for(weight, bias)
    if segments is not None:
        return _segmented.linear(x, weight, bias, segments)
    return F.linear(x, weight, bias)


def embedding(ids, weight, padding_idx=None):
    """Rows of ``weight`` [V, N] at integer ``ids`` [...] (the padding row gets no gradient)."""
    segments = _segments_for(weight)
    if segments is not None:
        return _segmented.embedding(ids, weight, padding_idx, segments)
    return F.embedding(ids, weight, padding_idx)


def add_layer_norm(x, residual, weight, bias, eps):
    """y = LayerNorm(x + residual) over the last dimension; residual may be None. x: [..., N];
    residual: broadcastable to x; weight, bias: [N]."""
    segments = _segments_for(weight, bias)
    if use_triton(x):
        if residual is not None:  # the kernel reads both as [M, N] rows of one dtype
            residual = residual.to(x.dtype).expand_as(x).contiguous()
        if segments is not None:
            return _segmented.add_layer_norm(x.contiguous(), residual, weight, bias, eps, segments, use_triton=True)
        return _layer_norm.add_layer_norm_triton(x.contiguous(), residual, weight, bias, eps)
    if segments is not None:
        return _segmented.add_layer_norm(x, residual, weight, bias, eps, segments, use_triton=False)
    return _layer_norm.add_layer_norm_reference(x, residual, weight, bias, eps)


def dropout_add_layer_norm(x, residual, weight, bias, eps, dropout_p):
    """y = LayerNorm(dropout(x) + residual) over the last dimension; ``dropout_p`` is the dropout
    probability (pass 0 in eval mode). x, residual: [..., N] of one shape; weight, bias: [N].
    On the CPU kernel, x may be bfloat16 beside a float32 residual (a linear layer's output under
    autocast): y is float32, as autocast's type promotion makes it."""
    if (use_cpu_kernels(x) and residual.shape == x.shape
            and residual.dtype == weight.dtype == bias.dtype == torch.float32):
        segments = _segments_for(weight, bias)
        if segments is not None:
            return _segmented.dropout_add_layer_norm(x, residual, weight, bias, eps, dropout_p, segments)
        return _dropout_add_layer_norm.dropout_add_layer_norm_cpu(x, residual, weight, bias, eps, dropout_p)
    return add_layer_norm(F.dropout(x, dropout_p) if dropout_p > 0 else x, residual, weight, bias, eps)


def bias_gelu(x, bias):
    """y = GELU(x + bias), the exact erf GELU. x: [..., N]; bias: [N]."""
    segments = _segments_for(bias)
    if use_triton(x):
        if segments is not None:
            return _segmented.bias_gelu(x.contiguous(), bias, segments, use_triton=True)
        return _bias_gelu.bias_gelu_triton(x.contiguous(), bias)
    if segments is not None:
        return _segmented.bias_gelu(x, bias, segments, use_triton=False)
    return _bias_gelu.bias_gelu_reference(x, bias)


def attention(q, k, v, mask_bias, dropout_p, scale):
    """softmax(q kᵀ · scale + mask_bias) v with dropout ``dropout_p`` on the probabilities (pass 0
    in eval mode). q, k, v: [B, heads, L, head_dim] (views are fine); mask_bias: None (every key is
    real) or [B, 1, 1, L] additive. With dropout on the CPU, the fused softmax+dropout kernel
    between two matmuls (SDPA's CPU path with dropout is the unfused math); otherwise SDPA."""
    if dropout_p > 0 and use_cpu_kernels(q) and (mask_bias is None or mask_bias.dtype in _CPU_KERNEL_DTYPES):
        B, _, L, _ = q.shape
        return _softmax_dropout.attention_cpu(q, k, v, None if mask_bias is None else mask_bias.reshape(B, L),
                                              dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias, dropout_p=dropout_p, scale=scale)


def linear_bias_gelu(x, weight, bias):
    """y = GELU(x Wᵀ + b), the exact erf GELU (BERT's FFN up-projection). x: [..., in]; weight:
    [out, in]; bias: [out]. Where the fused CPU kernels run, the matmul adds the bias (addmm, at no
    cost) and PyTorch's GELU follows: one pass over [..., out] fewer than a separate bias add (under
    CPU autocast both in bfloat16, as for a plain nn.Linear and GELU). Elsewhere the bias+GELU op
    adds it (the Triton kernel; under autocast, in float32)."""
    if use_cpu_kernels(x):
        return F.gelu(linear(x, weight, bias), approximate="none")
    return bias_gelu(linear(x, weight), bias)



def _use_packed_cpu_attention(tensor) -> bool:
    """Whether packed attention runs the extension's C++ op: the fused CPU kernels on, float32 (under
    CPU autocast, bfloat16, the PyTorch path runs)."""
    return tensor.dtype == torch.float32 and use_cpu_kernels(tensor)

def varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None):
    """Self-attention within each of B packed sequences. q, k, v: [T, heads, head_dim];
    cu_seqlens: [B + 1] int32 token offsets; max_seqlen: an int >= every length. Dropout with
    probability ``dropout_p`` applies to the attention probabilities (pass 0 in eval mode).
    Returns [T, heads, head_dim]. On the CPU in float32 with the extension, the C++ op reads the
    packed q, k, v in place; elsewhere (and under CPU autocast) PyTorch pads them for batched matmuls."""
    if use_triton(q):  # the kernels read [T, heads, head_dim] rows densely
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return _attention.varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    if _use_packed_cpu_attention(q):
        return _varlen_attention_cpu.varlen_attention_cpu(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    return _attention.varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                             fused_softmax_dropout=use_cpu_kernels(q))


def varlen_attention_qkv(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None):
    """:func:`varlen_attention` of the fused projection qkv [T, 3, heads, head_dim] (query, key,
    value). On the CPU in float32 the C++ op reads it in place and returns its gradient as one
    tensor (separate q, k, v views would cost a stack of their gradients); elsewhere it is
    ``varlen_attention(*qkv.unbind(1), ...)``."""
    if _use_packed_cpu_attention(qkv):
        return _varlen_attention_cpu.varlen_attention_qkv_cpu(qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    return varlen_attention(*qkv.unbind(1), cu_seqlens, max_seqlen, dropout_p, softmax_scale)
