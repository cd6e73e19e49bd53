"""Bias add fused with the exact (erf) GELU: y = GELU(x + bias)."""
import torch.nn.functional as F


def bias_gelu_reference(x, bias):
    """PyTorch reference. x: [..., N]; bias: [N]."""
    return F.gelu(x + bias, approximate="none")
