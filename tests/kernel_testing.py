"""Helpers shared by the kernel tests: dtype tolerances and NaN-poisoned allocations."""
import contextlib

import pytest
import torch

# The Triton kernels run natively on a GPU and in Triton's interpreter (tests/conftest.py) otherwise.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (dtype, atol, rtol) against a float64 reference computed on the same (rounded) inputs.
DTYPE_TOLERANCES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="float32"),
    pytest.param(torch.float16, 5e-3, 5e-3, id="float16"),
    pytest.param(torch.bfloat16, 4e-2, 4e-2, id="bfloat16"),
]


@contextlib.contextmanager
def nan_poisoned_allocations():
    """Within the block, ``torch.empty``/``torch.empty_like`` return floating tensors filled with
    NaN, so an output element a kernel forgets to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(tensor):
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    torch.empty = lambda *args, **kwargs: poisoned(empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poisoned(empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def leaf(tensor, dtype=None):
    """A detached copy on DEVICE (optionally cast) that requires grad."""
    return tensor.detach().to(DEVICE, dtype or tensor.dtype).clone().requires_grad_()
