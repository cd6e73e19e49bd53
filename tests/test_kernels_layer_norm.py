"""The fused add+LayerNorm Triton kernels (interpreted on the CPU) against float64 PyTorch."""
import pytest
import torch

from kernel_testing import DEVICE, DTYPE_TOLERANCES, leaf, nan_poisoned_allocations
from mtbert import kernels
from mtbert.kernels.layer_norm import add_layer_norm_forward, add_layer_norm_reference, add_layer_norm_triton


def run_and_compare(shape, dtype, atol, rtol, with_residual=True, eps=1e-5):
    N = shape[-1]
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    residual = torch.randn(shape, dtype=torch.float64) if with_residual else None
    weight, bias = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    grad_y = torch.randn(shape, dtype=torch.float64)

    inputs = [leaf(x, dtype), leaf(residual, dtype) if with_residual else None, leaf(weight, torch.float32),
              leaf(bias, torch.float32)]
    with nan_poisoned_allocations():
        y = add_layer_norm_triton(*inputs, eps)
        y.backward(grad_y.to(DEVICE, dtype))
    # The reference sees the same rounded inputs, in float64.
    reference = [leaf(t.detach(), torch.float64) if t is not None else None for t in inputs]
    y_ref = add_layer_norm_reference(*reference, eps)
    y_ref.backward(grad_y.to(DEVICE, dtype).double())

    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    for name, ours, theirs in zip(("x", "residual", "weight", "bias"), inputs, reference):
        if ours is None:
            continue
        # dweight/dbias sum over rows: compare relative to the gradient's size.
        scale = 1.0 if name in ("x", "residual") else max(1.0, theirs.grad.abs().max().item())
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=atol * scale, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 70, 37), (129, 384), (2, 5, 1000)], ids=str)
def test_matches_float64_reference(shape, dtype, atol, rtol):
    run_and_compare(shape, dtype, atol, rtol)


def test_without_residual():
    run_and_compare((17, 96), torch.float32, 2e-5, 2e-5, with_residual=False)


def test_constant_rows_are_finite():
    """A constant row has zero variance: eps keeps 1/std finite, the output is the bias."""
    x = torch.full((4, 33), 2.5, device=DEVICE)
    bias = torch.arange(33.0, device=DEVICE)
    y = add_layer_norm_triton(x, None, torch.ones(33, device=DEVICE), bias, 1e-12)
    torch.testing.assert_close(y, bias.expand(4, 33))


def test_statistics_are_float32():
    x = torch.randn(6, 40, dtype=torch.bfloat16, device=DEVICE)
    _, mean, rstd = add_layer_norm_forward(x, None, torch.ones(40, device=DEVICE), torch.zeros(40, device=DEVICE), 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (6,)
    torch.testing.assert_close(mean, x.float().mean(-1))


def test_dispatch_broadcasts_residual(monkeypatch):
    """kernels.add_layer_norm accepts a residual broadcastable to x (the position embeddings)."""
    monkeypatch.setenv("MTBERT_KERNELS", "triton")
    x, positions = torch.randn(2, 9, 48, device=DEVICE), torch.randn(9, 48, device=DEVICE)
    weight, bias = torch.randn(48, device=DEVICE), torch.randn(48, device=DEVICE)
    torch.testing.assert_close(kernels.add_layer_norm(x, positions, weight, bias, 1e-12),
                               add_layer_norm_reference(x, positions, weight, bias, 1e-12))


def _args(**changes):
    args = dict(x=torch.randn(4, 8), residual=torch.randn(4, 8), weight=torch.ones(8), bias=torch.zeros(8), eps=1e-5)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, argument", [
    (_args(x=torch.randint(0, 5, (4, 8))), "x"),
    (_args(x=torch.randn(8, 4).t()), "x"),
    (_args(residual=torch.randn(4, 7)), "residual"),
    (_args(residual=torch.randn(4, 8, dtype=torch.float16)), "residual"),
    (_args(weight=torch.ones(7)), "weight"),
    (_args(bias=torch.zeros(8, device="meta")), "bias"),
    (_args(eps=0.0), "eps"),
    (_args(x=torch.randn(2, 20000)), "x"),
], ids=["dtype", "non-contiguous", "shape", "residual-dtype", "weight-shape", "device", "eps", "too-wide"])
def test_bad_inputs_raise_value_error_naming_the_argument(args, argument):
    if argument == "x" and args["x"].shape[-1] == 20000:
        args["residual"] = None
        args["weight"], args["bias"] = torch.ones(20000), torch.zeros(20000)
    with pytest.raises(ValueError, match=argument):
        add_layer_norm_triton(**args)


def test_nan_input_raises_under_anomaly_detection():
    with torch.autograd.set_detect_anomaly(True), pytest.raises(ValueError, match="residual"):
        add_layer_norm_triton(torch.randn(3, 8), torch.full((3, 8), float("nan")), torch.ones(8), torch.zeros(8), 1e-5)
