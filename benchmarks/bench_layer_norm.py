"""Residual add + LayerNorm, forward + backward: mtbert.kernels.add_layer_norm (the fused Triton
kernels on a GPU; on the CPU the dispatcher runs PyTorch, so the two rows measure the same code)
against ``F.layer_norm(x + residual)``, in GB/s next to the triad probe of the same run.

Bytes moved at the least: forward reads x and residual and writes y, backward reads dy, x and
residual and writes the shared gradient of x and residual: 7 · M · N · element size. Each
implementation's output and gradients are checked against float64 before timing.

    pytest benchmarks/bench_layer_norm.py -o python_files='bench_*.py' [--benchmark-json=out.json]
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, FULL, synchronize

from mtbert import kernels

GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
# Rows: tokens of a batch (32 x 128 on the CPU; up to 128 x 512 on a GPU); N: MiniLM / BERT-base.
ROWS = (4096, 65536) if GPU else ((4096, 16384) if FULL else (4096,))
SHAPES = [(M, N) for M in ROWS for N in (384, 768)]
IMPLEMENTATIONS = ["torch layer_norm(x + residual)", "mtbert add_layer_norm"]


def group_name(M, N):
    return f"add+LayerNorm fwd+bwd M={M} N={N} {str(DTYPE)[6:]}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}".format(*s))
def test_bandwidth_probe(benchmark, triad_probe, shape):
    M, N = shape
    # The probe moves 12 bytes per float32 element: size it like one LayerNorm fwd+bwd.
    triad_probe(benchmark, 7 * M * N * DTYPE.itemsize // 12, group_name(M, N))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}".format(*s))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_add_layer_norm(benchmark, shape, impl):
    M, N = shape
    torch.manual_seed(0)
    x, residual, grad = (torch.randn(M, N, device=DEVICE, dtype=DTYPE) for _ in range(3))
    weight = torch.randn(N, device=DEVICE, requires_grad=True)
    bias = torch.randn(N, device=DEVICE, requires_grad=True)
    x.requires_grad_()
    residual.requires_grad_()

    if impl.startswith("torch"):
        def fn():
            return F.layer_norm(x + residual, (N,), weight.to(DTYPE), bias.to(DTYPE), 1e-12)
    else:
        def fn():
            return kernels.add_layer_norm(x, residual, weight, bias, 1e-12)

    # Numerics against float64.
    y = fn()
    y.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, residual, weight, bias)]
    y_ref = F.layer_norm(leaves[0] + leaves[1], (N,), leaves[2], leaves[3], 1e-12)
    y_ref.backward(grad.double())
    tol = dict(atol=5e-2, rtol=2e-2) if DTYPE == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), leaves[0].grad, **tol)
    torch.testing.assert_close(residual.grad.double(), leaves[1].grad, **tol)

    def step():
        x.grad = residual.grad = weight.grad = bias.grad = None
        fn().backward(grad)
        synchronize()

    benchmark.group = group_name(M, N)
    benchmark.extra_info.update(impl=impl, baseline=impl.startswith("torch"), bytes=7 * M * N * DTYPE.itemsize)
    benchmark.pedantic(step, rounds=30 if GPU else 10, iterations=1, warmup_rounds=3)
