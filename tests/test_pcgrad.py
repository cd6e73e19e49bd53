"""Flattened gradient combination (mtbert.optim.combine + the gradient_gram / gradient_combine ops)
against the plain per-pair implementation of PCGrad's Algorithm 1 (Yu et al. 2020) and of main +
auxiliary weighting (Bi et al. 2022) on float64 vectors, in the same projection order."""
import pytest
import torch

from mtbert import _extension

pytestmark = pytest.mark.skipif(not _extension.available(), reason="mtbert._C is not built")

from mtbert.optim import (combine_gradients, combine_reference, main_aux_weights, pcgrad_orders,  # noqa: E402
                          pcgrad_weights)
from mtbert.optim import _ops  # noqa: E402

KINDS = ["random", "conflicting", "non-conflicting", "zero", "duplicate", "opposite"]
SHARED, HEAD = 997, 13  # primes: no piece, vector or alignment boundary lines up


def make_grads(kind: str, K: int, generator: torch.Generator) -> torch.Tensor:
    """[K, SHARED + K * HEAD] task gradients; each task's head columns are zero in the other rows."""
    base = torch.randn(SHARED, generator=generator)
    noise = torch.randn(K, SHARED, generator=generator)
    if kind == "random":
        shared = noise
    elif kind == "conflicting":  # neighbours point against each other
        shared = torch.stack([(-1) ** i * base for i in range(K)]) + 0.3 * noise
    elif kind == "non-conflicting":
        shared = base + 0.1 * noise
    elif kind == "zero":  # a task without a loss this step
        shared = noise.clone()
        shared[0] = 0
        shared[-1] = 0
    elif kind == "duplicate":
        shared = noise.clone()
        shared[1] = shared[0]
    elif kind == "opposite":
        shared = noise.clone()
        shared[1] = -shared[0]
    grads = torch.zeros(K, SHARED + K * HEAD)
    grads[:, :SHARED] = shared
    for k in range(K):
        grads[k, SHARED + k * HEAD: SHARED + (k + 1) * HEAD] = torch.randn(HEAD, generator=generator)
    return grads


def boundaries_for(K: int, scope: str):
    return None if scope == "all" else [0, SHARED] + [SHARED + (k + 1) * HEAD for k in range(K)]


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all()
    # 1e-6 relative to the gradients' scale (an exactly cancelled entry has no relative error).
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item() + 1e-30)


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scope,reduction", [("shared", "sum"), ("all", "mean")])
def test_pcgrad_matches_per_pair_reference(K, kind, scope, reduction):
    gen = torch.Generator().manual_seed(K * 100 + KINDS.index(kind))
    grads = make_grads(kind, K, gen)
    orders = pcgrad_orders(K, gen)
    boundaries = boundaries_for(K, scope)
    out = torch.full((grads.shape[1],), float("nan"))
    combine_gradients(grads, out, "pcgrad", boundaries=boundaries, reduction=reduction, orders=orders)
    ref = combine_reference(grads, "pcgrad", boundaries=boundaries, reduction=reduction, orders=orders)
    assert_matches(out, ref)


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_main_aux_matches_per_pair_reference(K, kind, symmetric):
    gen = torch.Generator().manual_seed(K * 100 + KINDS.index(kind) + 7)
    grads = make_grads(kind, K, gen)
    main = (K - 1) if kind == "zero" else 1  # "zero" zeroes rows 0 and K-1: a zero main gradient
    boundaries = boundaries_for(K, "shared")
    out = torch.full((grads.shape[1],), float("nan"))
    combine_gradients(grads, out, "main-aux", boundaries=boundaries, main=main, aux_weight=0.3, symmetric=symmetric)
    ref = combine_reference(grads, "main-aux", boundaries=boundaries, main=main, aux_weight=0.3, symmetric=symmetric)
    assert_matches(out, ref)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sum_adds_rows_and_heads_keep_their_task_gradient(reduction):
    gen = torch.Generator().manual_seed(3)
    grads = make_grads("random", 3, gen)
    boundaries = boundaries_for(3, "shared")
    out = torch.full((grads.shape[1],), float("nan"))
    result = combine_gradients(grads, out, "sum", boundaries=boundaries, reduction=reduction)
    assert result.gram is None  # plain summation needs no Gram pass
    expected = grads.double().sum(0)
    expected[:SHARED] /= 3 if reduction == "mean" else 1
    assert_matches(out, expected)


def test_pcgrad_by_hand():
    # g1 = (1, 0), g2 = (-1, 1) conflict: g1' = g1 + g2 / 2 = (0.5, 0.5), g2' = g2 + g1 = (0, 1).
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    out = torch.empty(2)
    combine_gradients(grads, out, "pcgrad")
    assert out.tolist() == [0.5, 1.5]
    # Exactly opposite gradients cancel completely; zero gradients stay zero: never NaN.
    for grads, expected in ((torch.tensor([[2.0, -1.0], [-2.0, 1.0]]), [0.0, 0.0]), (torch.zeros(3, 2), [0.0, 0.0])):
        combine_gradients(grads, out, "pcgrad")
        assert out.tolist() == expected


def test_main_aux_by_hand():
    # main (1, 0); aux 0.3 * (-2, 1) = (-0.6, 0.3) conflicts: projected (0, 0.3); update (1, 0.3).
    grads = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])
    out = torch.empty(2)
    combine_gradients(grads, out, "main-aux", main=0, aux_weight=0.3)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.3]))
    w = main_aux_weights(grads.double() @ grads.double().T, main=0, aux_weight=0.3)
    torch.testing.assert_close(w, torch.tensor([1.6, 0.3], dtype=torch.float64))  # (1, 0.3) = 1.6 g1 + 0.3 g2


def test_projection_order_comes_from_the_generator():
    orders = pcgrad_orders(5, torch.Generator().manual_seed(1))
    assert orders == pcgrad_orders(5, torch.Generator().manual_seed(1))
    assert all(sorted(o) == [j for j in range(5) if j != i] for i, o in enumerate(orders))
    gram = torch.randn(5, 7, dtype=torch.float64)
    gram = gram @ gram.T - 3  # plenty of conflicts
    w1 = pcgrad_weights(gram, generator=torch.Generator().manual_seed(9))
    w2 = pcgrad_weights(gram, generator=torch.Generator().manual_seed(9))
    assert torch.equal(w1, w2)


def test_custom_weighting_plugs_in():
    grads = torch.randn(3, 101)
    out = torch.empty(101)
    result = combine_gradients(grads, out, lambda gram: torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64))
    torch.testing.assert_close(out, grads[0] + 2 * grads[1] - 0.5 * grads[2])
    torch.testing.assert_close(result.gram[0], grads.double() @ grads.double().T)


def test_overflowed_gradient_reaches_the_output():
    # Under a GradScaler an inf gradient must survive combination so that the step is skipped.
    grads = torch.randn(3, 50)
    grads[1, 7] = float("inf")
    out = torch.zeros(50)
    combine_gradients(grads, out, "pcgrad")
    assert not torch.isfinite(out).all()


@pytest.mark.parametrize("boundaries", [[0, 1, 1, 40, 41], [0, 41]])
def test_gram_per_segment_matches_float64(boundaries):
    grads = torch.randn(4, 41)
    G = _ops.gradient_gram(grads, boundaries)
    g = grads.double()
    expected = torch.stack([g[:, a:b] @ g[:, a:b].T for a, b in zip(boundaries, boundaries[1:])])
    torch.testing.assert_close(G, expected, rtol=1e-12, atol=1e-12)


def test_gram_and_combine_of_large_buffer_cross_pieces():
    # Several parallel pieces of each kernel, sizes that are not multiples of them.
    grads = torch.randn(3, 70_001)
    boundaries = [0, 50_003, 60_000, 70_001]
    G = _ops.gradient_gram(grads, boundaries)
    g = grads.double()
    expected = torch.stack([g[:, a:b] @ g[:, a:b].T for a, b in zip(boundaries, boundaries[1:])])
    torch.testing.assert_close(G, expected, rtol=1e-10, atol=1e-9)
    weights = torch.randn(3, 3, dtype=torch.float64)
    out = torch.full((70_001,), float("nan"))
    _ops.gradient_combine(grads, weights, boundaries, out)
    ref = torch.cat([weights[c] @ g[:, a:b] for c, (a, b) in enumerate(zip(boundaries, boundaries[1:]))])
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("K", [9, 10, 13, 16])
def test_gram_of_more_than_eight_rows_matches_float64(K):
    # Above 8 rows the Gram is swept in blocks of 4 rows (the last one smaller): K = 9 and 13 leave a
    # 1-row block, 10 a 2-row one. Segments cut the 16384-column pieces at odd places, one is empty.
    P = 40_003
    grads = torch.randn(K, P, generator=torch.Generator().manual_seed(K))
    boundaries = [0, 5, 16_390, 16_390, 33_001, P]
    G = _ops.gradient_gram(grads, boundaries)
    g = grads.double()
    expected = torch.stack([g[:, a:b] @ g[:, a:b].T for a, b in zip(boundaries, boundaries[1:])])
    torch.testing.assert_close(G, expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("K", [3, 10])
def test_gram_is_independent_of_the_thread_count(K):
    # Every piece writes its own partial and the partials are summed in piece order.
    grads = torch.randn(K, 100_003, generator=torch.Generator().manual_seed(1))
    boundaries = [0, 70_000, 100_003]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops.gradient_gram(grads, boundaries)
        torch.set_num_threads(2)
        two = _ops.gradient_gram(grads, boundaries)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_combine_into_large_misaligned_out():
    # Above 16 MiB the combination writes with non-temporal stores from 16-byte aligned addresses:
    # an out view 4 bytes past its allocation, and a head segment whose weights skip rows.
    P = (1 << 22) + 37
    grads = torch.randn(3, P)
    boundaries = [0, 1_000_003, P]
    weights = torch.tensor([[0.5, -1.25, 2.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    out = torch.full((P + 1,), float("nan"))[1:]
    _ops.gradient_combine(grads, weights, boundaries, out)
    g = grads.double()
    ref = torch.cat([weights[c] @ g[:, a:b] for c, (a, b) in enumerate(zip(boundaries, boundaries[1:]))])
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_argument():
    grads = torch.randn(3, 10)
    out = torch.empty(10)
    w = torch.ones(1, 3, dtype=torch.float64)
    cases = [
        (lambda: _ops.gradient_gram(grads.double(), [0, 10]), "grads must be float32"),
        (lambda: _ops.gradient_gram(torch.randn(10, 3).T, [0, 10]), "grads must be contiguous"),
        (lambda: _ops.gradient_gram(torch.randn(10), [0, 10]), "grads must be 2-D"),
        (lambda: _ops.gradient_gram(grads, [0, 9]), "boundaries must start at 0 and end at P"),
        (lambda: _ops.gradient_gram(grads, [0, 6, 4, 10]), "boundaries must be non-decreasing"),
        (lambda: _ops.gradient_combine(grads, w, [0, 10], torch.empty(9)), "out must have P = 10"),
        (lambda: _ops.gradient_combine(grads, w.float(), [0, 10], out), "weights must be float64"),
        (lambda: _ops.gradient_combine(grads, torch.ones(2, 3, dtype=torch.float64), [0, 10], out),
         r"weights must have shape \[C, K\]"),
        (lambda: _ops.gradient_combine(grads, w, [0, 10], grads[1]), "out must not overlap grads"),
        (lambda: _ops.gradient_combine(grads, w, [0, 10], torch.empty(10, device="meta")),
         "out must be on the same device as grads"),
        (lambda: combine_gradients(grads, out, "pcgard"), "method must be one of"),
        (lambda: combine_gradients(grads, out, "sum", reduction="avg"), "reduction must be one of"),
        (lambda: combine_gradients(grads, out, "main-aux", main=3), r"main must be a task index"),
        (lambda: combine_gradients(grads, out, "sum", boundaries=[0, 5, 10]), "boundaries must be"),
    ]
    for call, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            call()


def test_opcheck():
    grads = torch.randn(3, 37)
    torch.library.opcheck(torch.ops.mtbert.gradient_gram.default, (grads, [0, 20, 37]))
    torch.library.opcheck(torch.ops.mtbert.gradient_combine.default,
                          (grads, torch.randn(2, 3, dtype=torch.float64), [0, 20, 37], torch.empty(37)))
