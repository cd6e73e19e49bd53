"""The extension's CUDA kernels (csrc/cuda/: gradient_gram, gradient_combine, adamw_step) on the
GPU, against the references of their CPU tests: float64 Gram matrices, the plain per-pair PCGrad
and main + auxiliary loops (combine_reference), the other methods' CPU results (checked against
TorchJD there), torch.optim.AdamW and the float64 AdamW formula.

Skipped without a GPU (CI has none); benchmarks/gpu_check.sh runs them on one and counts a skip as
a failure, so a CPU-only build of mtbert._C on a GPU machine fails there."""
import pytest
import torch

from mtbert import _extension

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not _extension.available(), reason="mtbert._C is not built")]

from mtbert.optim import combine_gradients, combine_reference, pcgrad_orders  # noqa: E402
from mtbert.optim.combine import METHODS, REFERENCE_METHODS  # noqa: E402
from mtbert.optim import _ops  # noqa: E402
from test_adamw import steps_match_float64_formula, torch_formula_matches_torch_adamw  # noqa: E402
from test_pcgrad import KINDS, assert_matches, boundaries_for, make_grads  # noqa: E402

CUDA = torch.device("cuda")


@pytest.mark.parametrize("P", [1, 997, 1 << 20 | 3])  # one column, a few blocks, many blocks and a ragged tail
@pytest.mark.parametrize("K", [2, 5])
def test_gradient_gram_matches_float64_per_segment(K, P):
    grads = torch.randn(K, P)
    boundaries = sorted({0, P // 3, P // 2, P})
    gram = _ops.gradient_gram(grads.to(CUDA), boundaries).cpu()
    assert gram.dtype == torch.float64 and gram.shape == (len(boundaries) - 1, K, K)
    for c, (begin, end) in enumerate(zip(boundaries, boundaries[1:])):
        segment = grads[:, begin:end].double()
        torch.testing.assert_close(gram[c], segment @ segment.T, rtol=1e-5, atol=1e-5 * (end - begin))


@pytest.mark.parametrize("K", [2, 3, 6])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,scope,reduction", [("pcgrad", "shared", "sum"), ("pcgrad", "all", "mean"),
                                                    ("main-aux", "shared", "sum"), ("sum", "shared", "sum")])
def test_combination_on_cuda_matches_per_pair_reference(K, kind, method, scope, reduction):
    gen = torch.Generator().manual_seed(K * 100 + KINDS.index(kind))
    grads = make_grads(kind, K, gen)
    boundaries = boundaries_for(K, scope)
    options = {"orders": pcgrad_orders(K, gen), "reduction": reduction} if method == "pcgrad" else {}
    if method == "main-aux":
        options = {"main": K - 1 if kind == "zero" else 1, "aux_weight": 0.3}
    out = torch.full((grads.shape[1],), float("nan"), device=CUDA)
    combine_gradients(grads.to(CUDA), out, method, boundaries=boundaries, **options)
    assert_matches(out.cpu(), combine_reference(grads, method, boundaries=boundaries, **options))


@pytest.mark.parametrize("kind", ["random", "conflicting"])
@pytest.mark.parametrize("method", sorted(set(METHODS) - set(REFERENCE_METHODS)))
def test_other_methods_on_cuda_equal_their_cpu_results(method, kind):
    """The methods checked against TorchJD on the CPU (test_methods.py) give the same combination
    from the GPU's Gram matrix; 1e-3 relative, as the iterative solvers amplify the Grams' rounding."""
    grads = make_grads(kind, 3, torch.Generator().manual_seed(KINDS.index(kind)))
    boundaries = boundaries_for(3, "shared")
    on_cpu, on_cuda = torch.empty(grads.shape[1]), torch.empty(grads.shape[1], device=CUDA)
    combine_gradients(grads, on_cpu, method, boundaries=boundaries, generator=torch.Generator().manual_seed(0))
    combine_gradients(grads.to(CUDA), on_cuda, method, boundaries=boundaries,
                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(on_cuda).all()
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-3, atol=1e-3 * on_cpu.abs().max().item())


def test_fused_adamw_on_cuda_matches_torch_adamw_on_cuda():
    assert torch_formula_matches_torch_adamw(steps=300, device=CUDA).flat.params.device.type == "cuda"


@pytest.mark.parametrize("formula, correct_bias", [("handout", True), ("handout", False), ("torch", True)])
def test_fused_adamw_on_cuda_matches_float64_formula(formula, correct_bias):
    shapes = [(1,), (17,), (3, 5), (100_003,)]  # length 1, odd sizes, one spanning many thread blocks
    params = [torch.nn.Parameter(torch.randn(s, device=CUDA)) for s in shapes]
    hyper = dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, correct_bias=correct_bias, formula=formula)
    assert steps_match_float64_formula(params, hyper, steps=30).flat.params.device.type == "cuda"
