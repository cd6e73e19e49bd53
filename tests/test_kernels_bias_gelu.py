"""The fused bias+GELU Triton kernels (interpreted on the CPU) against float64 PyTorch."""
import pytest
import torch

from kernel_testing import DEVICE, DTYPE_TOLERANCES, leaf, nan_poisoned_allocations
from mtbert.kernels.bias_gelu import bias_gelu_reference, bias_gelu_triton


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37, 129), (70, 1536), (5, 2, 300)], ids=str)
def test_matches_float64_reference(shape, dtype, atol, rtol):
    x = torch.randn(shape, dtype=torch.float64) * 3
    bias = torch.randn(shape[-1], dtype=torch.float64)
    grad_y = torch.randn(shape, dtype=torch.float64).to(DEVICE, dtype)
    x_in, bias_in = leaf(x, dtype), leaf(bias, torch.float32)
    with nan_poisoned_allocations():
        y = bias_gelu_triton(x_in, bias_in)
        y.backward(grad_y)
    x_ref, bias_ref = leaf(x_in, torch.float64), leaf(bias_in, torch.float64)
    y_ref = bias_gelu_reference(x_ref, bias_ref)
    y_ref.backward(grad_y.double())
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(x_in.grad.double(), x_ref.grad, atol=atol, rtol=rtol)
    # dbias sums over rows: tolerance relative to its size.
    scale = max(1.0, bias_ref.grad.abs().max().item())
    torch.testing.assert_close(bias_in.grad.double(), bias_ref.grad, atol=atol * scale, rtol=rtol)


def test_exact_erf_not_tanh_approximation():
    """At z = -3 the erf GELU is -0.004050 and the tanh approximation -0.003638."""
    y = bias_gelu_triton(torch.tensor([[-3.0]], device=DEVICE), torch.zeros(1, device=DEVICE))
    assert abs(y.item() - (-0.0040496)) < 1e-6


@pytest.mark.parametrize("x, bias, argument", [
    (torch.randint(0, 3, (2, 4)), torch.zeros(4), "x"),
    (torch.randn(4, 2).t(), torch.zeros(4), "x"),
    (torch.randn(2, 4), torch.zeros(5), "bias"),
    (torch.randn(2, 4), torch.zeros(4, device="meta"), "bias"),
], ids=["dtype", "non-contiguous", "bias-shape", "device"])
def test_bad_inputs_raise_value_error_naming_the_argument(x, bias, argument):
    with pytest.raises(ValueError, match=argument):
        bias_gelu_triton(x, bias)


def test_nan_input_raises_under_anomaly_detection():
    with torch.autograd.set_detect_anomaly(True), pytest.raises(ValueError, match="x"):
        bias_gelu_triton(torch.tensor([[1.0, float("nan")]]), torch.zeros(2))
