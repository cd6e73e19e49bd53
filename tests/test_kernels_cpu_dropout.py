"""The fused CPU kernels with dropout (csrc/dropout_add_layer_norm.cpp, csrc/softmax_dropout.cpp):
outputs and every gradient against float64 PyTorch applying the kernel's own keep mask (so the
backward is checked to use the forward's mask), awkward shapes, the mask's statistics and
reproducibility, the weight gradients split by row ranges, opcheck, and bad input."""
import pytest
import torch

from mtbert import BertConfig, BertModel, _extension, kernels
from mtbert.kernels import GradientSegments
from mtbert.kernels.dropout_add_layer_norm import (backward_op, dropout_add_layer_norm_cpu,
                                                   dropout_add_layer_norm_reference, forward_op)
from mtbert.kernels.softmax_dropout import softmax_dropout_cpu, softmax_dropout_reference

pytestmark = pytest.mark.skipif(not _extension.available(), reason="needs the compiled extension mtbert._C")

EPS = 1e-12
TOL = dict(atol=2e-5, rtol=2e-5)
# bfloat16 (CPU autocast): inputs are widened exactly and every sum is float32, so a result stored in
# float32 meets the float64 reference as tightly as the float32 kernel does; one stored in bfloat16 is
# off by its single rounding, at most 2^-9 relative (the atol covers values near zero).
BF16_TOL = dict(atol=1e-4, rtol=2**-8)


def _seed_drawn_after(manual_seed):
    """The seed a kernel draws from torch's generator right after ``torch.manual_seed(manual_seed)``."""
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


# Rows and features: one element, one row, fewer features than a Philox block (4), not multiples of
# the vector width (8 / 16), an odd hidden size, BERT-base's, leading dimensions to flatten.
LN_SHAPES = [(1, 1), (1, 3), (2, 5), (7, 17), (33, 129), (4, 768), (2, 3, 23)]


@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_add_layer_norm_matches_float64_with_its_own_mask(shape, dropout_p, x_dtype):
    """bfloat16 x: a linear layer's output beside the float32 residual (CPU autocast); y stays
    float32, x's gradient is bfloat16. The reference runs in float64 on the same (rounded) x."""
    N = shape[-1]
    x, residual = torch.randn(shape).to(x_dtype), torch.randn(shape)
    weight, bias = 1 + 0.3 * torch.randn(N), 0.3 * torch.randn(N)
    seed = _seed_drawn_after(11)
    keep = forward_op(x, residual, weight, bias, EPS, dropout_p, seed=seed)[4]
    keep = keep.view(shape).bool() if dropout_p > 0 else torch.ones(shape, dtype=torch.bool)
    ours = _leaves(x, residual, weight, bias)
    torch.manual_seed(11)  # the wrapper draws the same seed, hence the same mask
    y = dropout_add_layer_norm_cpu(*ours, EPS, dropout_p)
    reference = _leaves(x, residual, weight, bias, dtype=torch.float64)
    y_ref = dropout_add_layer_norm_reference(*reference, EPS, dropout_p, keep=keep)
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    grad_y = torch.randn(shape)
    y.backward(grad_y)
    y_ref.backward(grad_y.double())
    assert y.dtype == torch.float32 and ours[0].grad.dtype == x_dtype
    for name, a, b in zip(("x", "residual", "weight", "bias"), ours, reference):
        tol = BF16_TOL if a.grad.dtype == torch.bfloat16 else TOL
        torch.testing.assert_close(a.grad.double(), b.grad, **tol, msg=lambda m: f"d{name}: {m}")


def test_dropout_add_layer_norm_weight_gradients_split_by_row_ranges():
    """Ranges of the backward (the multitask pass's segments, one empty) get the sums over their rows."""
    M, N, p = 40, 37, 0.2
    x, residual, grad_y = torch.randn(M, N), torch.randn(M, N), torch.randn(M, N)
    weight, bias = torch.randn(N), torch.randn(N)
    _, z, mean, rstd, keep = forward_op(x, residual, weight, bias, EPS, p, seed=3)
    bounds = [0, 13, 13, 40]
    _, _, grad_weight, grad_bias = backward_op(grad_y, z, keep, weight, mean, rstd, p, bounds)
    z_hat = (z.double() - mean.double()[:, None]) * rstd.double()[:, None]
    for k, (begin, end) in enumerate(zip(bounds, bounds[1:])):
        torch.testing.assert_close(grad_weight[k].double(), (grad_y.double() * z_hat)[begin:end].sum(0), **TOL)
        torch.testing.assert_close(grad_bias[k].double(), grad_y.double()[begin:end].sum(0), **TOL)


# (batch, heads, queries, keys): one score, fewer keys than a Philox block, odd lengths, BERT-like.
SCORE_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 3), (3, 2, 17, 17), (2, 12, 51, 51)]


@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.5])
def test_softmax_dropout_matches_float64_with_its_own_mask(shape, dropout_p):
    B, _, _, L = shape
    scores = 3 * torch.randn(shape)
    mask_bias = torch.zeros(B, L)
    mask_bias[0, L // 2:] = torch.finfo(torch.float32).min  # skipped keys (all of them when L = 1)
    seed = _seed_drawn_after(5)
    keep = softmax_dropout_cpu(scores, mask_bias, 0.3, dropout_p, seed=seed)[2]
    keep = keep.bool() if dropout_p > 0 else torch.ones(shape, dtype=torch.bool)
    (ours,) = _leaves(scores)
    torch.manual_seed(5)
    out, probs, _ = softmax_dropout_cpu(ours, mask_bias, 0.3, dropout_p)
    (reference,) = _leaves(scores, dtype=torch.float64)
    out_ref = softmax_dropout_reference(reference, mask_bias.double(), 0.3, dropout_p, keep=keep)
    torch.testing.assert_close(out.double(), out_ref, **TOL)
    torch.testing.assert_close(probs.double(), softmax_dropout_reference(reference, mask_bias.double(), 0.3, 0.0),
                               **TOL)
    if L // 2 == 0:  # a row without keys is uniform (Hugging Face's finite mask), not NaN
        assert torch.isfinite(out).all()
    grad_out = torch.randn(shape)
    out.backward(grad_out)
    out_ref.backward(grad_out.double())
    torch.testing.assert_close(ours.grad.double(), reference.grad, **TOL)


def _keep_fraction_and_masks(op, p, seed):
    if op == "layer_norm":
        x = torch.randn(512, 384)
        return forward_op(x, x, torch.ones(384), torch.zeros(384), EPS, p, seed=seed)[4].bool()
    scores = torch.randn(4, 8, 64, 64)
    return softmax_dropout_cpu(scores, None, 1.0, p, seed=seed)[2].bool().reshape(-1, 64)


@pytest.mark.parametrize("op", ["layer_norm", "softmax"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p_everywhere_and_reproducibly(op, p):
    keep = _keep_fraction_and_masks(op, p, seed=123)
    n = keep.numel()
    # Within 5 binomial standard deviations over the whole mask, over each quarter of the rows' columns
    # (each is one of a Philox block's four words) and over the first and last rows.
    for part in [keep, *keep.chunk(4, dim=1), keep[: keep.shape[0] // 2], keep[keep.shape[0] // 2:]]:
        count = part.numel()
        assert abs(part.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / count) ** 0.5, part.shape
    # Neighbouring rows and columns are not copies of each other.
    assert (keep[1:] != keep[:-1]).float().mean() > 0.5 * 2 * p * (1 - p)
    assert (keep[:, 1:] != keep[:, :-1]).float().mean() > 0.5 * 2 * p * (1 - p)
    assert torch.equal(keep, _keep_fraction_and_masks(op, p, seed=123))
    assert not torch.equal(keep, _keep_fraction_and_masks(op, p, seed=124))
    assert n > 10_000


def test_masks_come_from_torch_generator():
    x = torch.randn(6, 40)
    weight, bias = torch.ones(40), torch.zeros(40)
    torch.manual_seed(0)
    first = dropout_add_layer_norm_cpu(x, x, weight, bias, EPS, 0.5)
    torch.manual_seed(0)
    assert torch.equal(dropout_add_layer_norm_cpu(x, x, weight, bias, EPS, 0.5), first)
    assert not torch.equal(dropout_add_layer_norm_cpu(x, x, weight, bias, EPS, 0.5), first)


def test_opcheck():
    x, residual = torch.randn(5, 19), torch.randn(5, 19)
    weight, bias = torch.randn(19), torch.randn(19)
    seed = torch.tensor(9)
    for p in (0.0, 0.3):
        args = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
        torch.library.opcheck(torch.ops.mtbert.dropout_add_layer_norm, (*args, EPS, p, seed))
        _, z, mean, rstd, keep = torch.ops.mtbert.dropout_add_layer_norm(x, residual, weight, bias, EPS, p, seed)
        for row_bounds in ([0, 2, 5], []):
            torch.library.opcheck(torch.ops.mtbert.dropout_add_layer_norm_backward,
                                  (torch.randn_like(x), z, keep, weight, mean, rstd, p, row_bounds))
        scores, mask_bias = torch.randn(2, 3, 4, 7), torch.zeros(2, 7)
        torch.library.opcheck(torch.ops.mtbert.softmax_dropout,
                              (scores.clone().requires_grad_(), mask_bias, 0.5, p, seed))
        out, probs, keep = torch.ops.mtbert.softmax_dropout(scores, mask_bias, 0.5, p, seed)
        torch.library.opcheck(torch.ops.mtbert.softmax_dropout_backward, (torch.randn_like(out), probs, keep, 0.5, p))


@pytest.mark.parametrize("change, argument", [
    (dict(x=torch.randn(3, 8, dtype=torch.float64)), "x"),
    (dict(residual=torch.randn(3, 7)), "residual"),
    (dict(weight=torch.randn(7)), "weight"),
    (dict(bias=torch.randn(8, dtype=torch.float64)), "bias"),
    (dict(eps=0.0), "eps"),
    (dict(dropout_p=1.0), "dropout_p"),
])
def test_dropout_add_layer_norm_bad_input_names_the_argument(change, argument):
    args = dict(x=torch.randn(3, 8), residual=torch.randn(3, 8), weight=torch.randn(8), bias=torch.randn(8),
                eps=EPS, dropout_p=0.1) | change
    with pytest.raises(ValueError, match=argument):
        dropout_add_layer_norm_cpu(**args)


@pytest.mark.parametrize("change, argument", [
    (dict(scores=torch.randn(2, 3, 4)), "scores"),
    (dict(mask_bias=torch.zeros(2, 5)), "mask_bias"),
    (dict(dropout_p=-0.1), "dropout_p"),
])
def test_softmax_dropout_bad_input_names_the_argument(change, argument):
    args = dict(scores=torch.randn(2, 3, 4, 4), mask_bias=torch.zeros(2, 4), scale=1.0, dropout_p=0.1) | change
    with pytest.raises(ValueError, match=argument):
        softmax_dropout_cpu(**args)


def test_model_compiles_with_the_fused_kernels_and_dropout():
    """torch.compile(fullgraph=True) traces the fused ops on both paths (the packed one with a
    data-dependent token count), in training mode with dropout."""
    model = _tiny_model()
    ids = torch.randint(1, 60, (3, 7))
    mask = (torch.arange(7) < torch.tensor([7, 5, 6])[:, None]).long()
    for unpad in (False, True):
        model.unpad = unpad
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            out = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, mask)
        (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
        assert torch.isfinite(out.last_hidden_state).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ops_reject_bad_input_naming_the_argument():
    """The C++ checks behind the wrappers (what a direct torch.ops call meets)."""
    x, w = torch.randn(4, 6), torch.randn(6)
    y, z, mean, rstd, keep = torch.ops.mtbert.dropout_add_layer_norm(x, x, w, w, EPS, 0.2, torch.tensor(1))
    with pytest.raises(RuntimeError, match="row_bounds"):
        torch.ops.mtbert.dropout_add_layer_norm_backward(y, z, keep, w, mean, rstd, 0.2, [0, 3])
    with pytest.raises(RuntimeError, match="keep"):
        torch.ops.mtbert.dropout_add_layer_norm_backward(y, z, keep[:2], w, mean, rstd, 0.2, [0, 4])
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.mtbert.dropout_add_layer_norm(x, x, w, w, EPS, 0.2, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="mask_bias"):
        torch.ops.mtbert.softmax_dropout(torch.randn(1, 1, 2, 3), torch.zeros(1, 2), 1.0, 0.1, torch.tensor(1))


def _tiny_model():
    config = BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=40, max_position_embeddings=16, hidden_dropout_prob=0.2,
                        attention_probs_dropout_prob=0.3)
    return BertModel(config).train()


@pytest.mark.parametrize("unpad", [True, False])
def test_segmented_pass_with_dropout_sums_to_the_plain_gradients(unpad):
    """The multitask pass (GradientSegments) with the fused kernels and dropout on: the segments'
    gradients add up to the plain backward's, the masks being the same under the same seed."""
    assert kernels.use_cpu_kernels(torch.zeros(1))
    model = _tiny_model()
    model.unpad = unpad
    lengths = [5, 3, 7, 7, 2]
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, 60, mask.shape) * mask
    params = list(model.parameters())

    def loss():
        out = model(ids, mask)
        return (out.last_hidden_state * mask[..., None]).square().sum() + out.pooler_output.sum()

    torch.manual_seed(1)
    loss().backward()
    plain = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    destinations = {id(p): [torch.zeros_like(p) for _ in range(2)] for p in params}
    torch.manual_seed(1)
    with GradientSegments(mask, [0, 2, 5], destinations):
        loss().backward()
    for (name, _), views, expected in zip(model.named_parameters(), destinations.values(), plain):
        torch.testing.assert_close(views[0] + views[1], expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_equal_rows_give_equal_results_wherever_they_lie():
    """A row's result does not depend on its buffer's alignment or its place in the batch (no
    alignment peeling in the sums): SBERT's |u - v| of two equal sentences stays exactly 0."""
    N = 384
    x, residual, grad_y = torch.randn(3, N), torch.randn(3, N), torch.randn(3, N)
    weight, bias = torch.randn(N), torch.randn(N)
    shifted = [torch.empty(4 * N + 1)[1:].view(4, N) for _ in range(3)]  # 4 bytes off, one row later
    for buffer, rows in zip(shifted, (x, residual, grad_y)):
        buffer[1:] = rows
        buffer[0] = 0.0
    y, z, mean, rstd, _ = forward_op(x, residual, weight, bias, EPS, 0.0)
    y_s, z_s, mean_s, rstd_s, _ = forward_op(shifted[0], shifted[1], weight, bias, EPS, 0.0)
    assert torch.equal(y, y_s[1:])
    grads = backward_op(grad_y, z, torch.empty(0, 0, dtype=torch.uint8), weight, mean, rstd, 0.0, [0, 3])
    grads_s = backward_op(shifted[2], z_s, torch.empty(0, 0, dtype=torch.uint8), weight, mean_s, rstd_s, 0.0, [0, 1, 4])
    assert torch.equal(grads[1], grads_s[1][1:])
    scores = torch.randn(1, 1, 3, 51)
    scores_s = torch.empty(1 + 4 * 51)[1:].view(1, 1, 4, 51)
    scores_s[0, 0, 1:] = scores[0, 0]
    assert torch.equal(softmax_dropout_cpu(scores, None, 0.3, 0.0)[0],
                       softmax_dropout_cpu(scores_s, None, 0.3, 0.0)[0][:, :, 1:])



@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 3), (2, 12, 51, 51)], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_softmax_dropout_takes_bfloat16_scores(shape, dropout_p):
    """bfloat16 scores and a bfloat16 mask (what attention's first matmul gives under CPU autocast):
    the output and probabilities in bfloat16 within one rounding of float64 on the same scores. The
    gradient is checked against float64 from the probabilities the kernel saved (bfloat16, as
    PyTorch's own bfloat16 softmax saves them), so that only its final rounding is allowed for."""
    B, _, _, L = shape
    scores = (3 * torch.randn(shape)).bfloat16()
    mask_bias = torch.zeros(B, L, dtype=torch.bfloat16)
    mask_bias[0, L // 2:] = torch.finfo(torch.bfloat16).min
    keep = softmax_dropout_cpu(scores, mask_bias, 0.3, dropout_p, seed=_seed_drawn_after(6))[2]
    keep = keep.bool() if dropout_p > 0 else torch.ones(shape, dtype=torch.bool)
    (ours,) = _leaves(scores)
    torch.manual_seed(6)
    out, probs, _ = softmax_dropout_cpu(ours, mask_bias, 0.3, dropout_p)
    assert out.dtype == probs.dtype == torch.bfloat16
    (reference,) = _leaves(scores, dtype=torch.float64)
    out_ref = softmax_dropout_reference(reference, mask_bias.double(), 0.3, dropout_p, keep=keep)
    torch.testing.assert_close(out.double(), out_ref, **BF16_TOL)
    torch.testing.assert_close(probs.double(), softmax_dropout_reference(reference, mask_bias.double(), 0.3, 0.0),
                               **BF16_TOL)
    grad_out = torch.randn(shape).bfloat16()
    out.backward(grad_out)
    assert ours.grad.dtype == torch.bfloat16
    d_probs = grad_out.double() * keep / (1 - dropout_p)
    p = probs.double()
    grad_ref = 0.3 * p * (d_probs - (p * d_probs).sum(-1, keepdim=True))
    torch.testing.assert_close(ours.grad.double(), grad_ref, **BF16_TOL)


def test_opcheck_bfloat16():
    x, residual = torch.randn(5, 19).bfloat16(), torch.randn(5, 19)
    weight, bias = torch.randn(19), torch.randn(19)
    seed = torch.tensor(9)
    args = [x.clone().requires_grad_(), residual.clone().requires_grad_(), weight, bias]
    torch.library.opcheck(torch.ops.mtbert.dropout_add_layer_norm, (*args, EPS, 0.3, seed))
    _, z, mean, rstd, keep = torch.ops.mtbert.dropout_add_layer_norm(x, residual, weight, bias, EPS, 0.3, seed)
    torch.library.opcheck(torch.ops.mtbert.dropout_add_layer_norm_backward,
                          (torch.randn(5, 19), z, keep, weight, mean, rstd, 0.3, [0, 2, 5], torch.bfloat16))
    scores, mask_bias = torch.randn(2, 3, 4, 7).bfloat16(), torch.zeros(2, 7)
    torch.library.opcheck(torch.ops.mtbert.softmax_dropout, (scores.clone().requires_grad_(), mask_bias, 0.5, 0.3, seed))
    out, probs, keep = torch.ops.mtbert.softmax_dropout(scores, mask_bias, 0.5, 0.3, seed)
    torch.library.opcheck(torch.ops.mtbert.softmax_dropout_backward, (torch.randn_like(out), probs, keep, 0.5, 0.3))


def test_bfloat16_bad_input_names_the_argument():
    x, residual, w = torch.randn(3, 8).bfloat16(), torch.randn(3, 8), torch.randn(8)
    with pytest.raises(ValueError, match="x"):
        dropout_add_layer_norm_cpu(x.half(), residual, w, w, EPS, 0.1)
    with pytest.raises(ValueError, match="residual"):
        dropout_add_layer_norm_cpu(x, residual.bfloat16(), w, w, EPS, 0.1)
    with pytest.raises(ValueError, match="scores"):
        softmax_dropout_cpu(torch.randn(1, 1, 2, 3).half(), None, 1.0, 0.1)
    _, z, mean, rstd, keep = forward_op(x, residual, w, w, EPS, 0.1, seed=1)
    with pytest.raises(RuntimeError, match="x_dtype"):
        torch.ops.mtbert.dropout_add_layer_norm_backward(residual, z, keep, w, mean, rstd, 0.1, [], torch.float16)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.mtbert.softmax_dropout_backward(torch.randn(1, 1, 2, 3), torch.rand(1, 1, 2, 3).bfloat16(),
                                                  torch.empty(0, dtype=torch.uint8), 1.0, 0.0)


def test_model_under_cpu_autocast_runs_the_fused_kernels(monkeypatch):
    """Under CPU bfloat16 autocast the model's dropout ops are the fused kernels (called once per
    layer each: two LayerNorms, one softmax), and with dropout off they give what PyTorch's ops give
    under the same autocast, outputs and float32 parameter gradients, within bfloat16's precision."""
    calls = {"dropout_add_layer_norm": 0, "softmax_dropout": 0}
    for name in calls:
        original = getattr(kernels, f"_{name}")
        function = "dropout_add_layer_norm_cpu" if name == "dropout_add_layer_norm" else "softmax_dropout_cpu"
        wrapped = getattr(original, function)

        def counting(*args, _name=name, _wrapped=wrapped, **kwargs):
            calls[_name] += 1
            return _wrapped(*args, **kwargs)
        monkeypatch.setattr(original, function, counting)
    model = _tiny_model()
    mask = (torch.arange(7) < torch.tensor([7, 5, 6])[:, None]).long()
    ids = torch.randint(1, 60, mask.shape) * mask
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, mask)
    assert calls == {"dropout_add_layer_norm": 4, "softmax_dropout": 2}

    for module in model.modules():  # dropout off: the two paths then compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, mask)
        (out.last_hidden_state.float().square().mean() + out.pooler_output.float().sum()).backward()
        return out.last_hidden_state.float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused, fused_grads = run()
    monkeypatch.setenv("MTBERT_KERNELS", "torch")
    plain, plain_grads = run()
    torch.testing.assert_close(fused, plain, atol=3e-2, rtol=0)
    for name, grad in plain_grads.items():
        assert fused_grads[name].dtype == torch.float32
        error = (fused_grads[name] - grad).norm() / grad.norm().clamp_min(1e-3)
        assert error < 5e-2, f"{name}: relative gradient error {error:.3f}"
