"""Thin wrappers over the extension's flat-buffer ops (``torch.ops.mtbert.*``) and their fake
(meta) implementations, which make them traceable by ``torch.compile`` and checkable with
``torch.library.opcheck``. The C++ kernels are in ``csrc/`` (CPU) and ``csrc/cuda/`` (CUDA)."""
from typing import Sequence

import torch

from .. import _extension


def gradient_gram(grads: torch.Tensor, boundaries: Sequence[int]) -> torch.Tensor:
    """Per-segment Gram matrices: grads [K, P] float32 -> [C, K, K] float64, one K x K matrix per
    segment [boundaries[c], boundaries[c + 1]) of the columns."""
    return _extension.ops().gradient_gram(grads, list(boundaries))


def gradient_combine(grads: torch.Tensor, weights: torch.Tensor, boundaries: Sequence[int], out: torch.Tensor) -> None:
    """out[p] = sum_k weights[c, k] * grads[k, p] for the columns p of segment c.
    grads [K, P] float32, weights [C, K] float64 on the CPU, out [P] float32 (written in place)."""
    _extension.ops().gradient_combine(grads, weights, list(boundaries), out)


def adamw_step(param, exp_avg, exp_avg_sq, grad, segments, *, lr, beta1, beta2, eps, weight_decay, correct_bias,
               formula) -> None:
    """One AdamW step, in place, over the rows (begin, end, step) of ``segments`` ([S, 3] int64, CPU)
    of the flat float32 buffers ``param``, ``exp_avg``, ``exp_avg_sq``, ``grad`` (all [N])."""
    _extension.ops().adamw_step(param, exp_avg, exp_avg_sq, grad, segments, lr, beta1, beta2, eps, weight_decay,
                                correct_bias, formula)


def _check_float_buffer(t: torch.Tensor, name: str, dim: int) -> None:
    torch._check(t.dim() == dim, lambda: f"{name} must be {dim}-D, got {t.dim()} dimensions")
    torch._check(t.dtype == torch.float32, lambda: f"{name} must be float32, got {t.dtype}")


def _check_same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    torch._check(t.device == ref.device,
                 lambda: f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def _register_fakes():
    # The fakes check what the C++ checks that shapes and devices decide, so traced code fails alike.
    @torch.library.register_fake("mtbert::gradient_gram")
    def _gradient_gram_fake(grads, boundaries):
        _check_float_buffer(grads, "grads", 2)
        return grads.new_empty((len(boundaries) - 1, grads.shape[0], grads.shape[0]), dtype=torch.float64)

    @torch.library.register_fake("mtbert::gradient_combine")
    def _gradient_combine_fake(grads, weights, boundaries, out):
        _check_float_buffer(grads, "grads", 2)
        _check_float_buffer(out, "out", 1)
        _check_same_device(out, "out", grads, "grads")
        return None

    @torch.library.register_fake("mtbert::adamw_step")
    def _adamw_step_fake(param, exp_avg, exp_avg_sq, grad, segments, lr, beta1, beta2, eps, weight_decay,
                         correct_bias, formula):
        for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grad", grad)):
            _check_float_buffer(t, name, 1)
            _check_same_device(t, name, param, "param")
        return None


if _extension.available():
    _register_fakes()
