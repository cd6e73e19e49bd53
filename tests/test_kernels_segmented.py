"""Gradients split by segment (mtbert.kernels.GradientSegments): each op's per-segment parameter
gradients equal plain autograd run on that segment's rows alone (float64 PyTorch), its input
gradients equal plain autograd on the whole batch; the same through the encoder on both its
paths; bad segments and parameters without destinations are refused."""
import pytest
import torch
import torch.nn.functional as F

from mtbert import BertConfig, BertModel, kernels
from mtbert.kernels import GradientSegments

# A right-padded batch of 5 sequences in 3 segments, the middle one empty.
LENGTHS = [3, 1, 4, 2, 4]
OFFSETS = [0, 2, 2, 5]


def _mask(lengths=LENGTHS, width=5):
    return (torch.arange(width) < torch.tensor(lengths)[:, None]).long()


def _token_ranges():
    ends = torch.tensor(LENGTHS).cumsum(0).tolist()
    edges = [0] + [ends[o - 1] if o else 0 for o in OFFSETS[1:]]
    return list(zip(edges, edges[1:]))


def _destinations(params):
    return {id(p): [torch.zeros_like(p) for _ in OFFSETS[1:]] for p in params}


def _check_split(op, reference_op, inputs, params, **tolerance):
    """Runs op(*inputs, *params) under segments on the packed tokens; compares the output and the
    input gradients with float64 autograd of reference_op on the whole batch, and the destinations
    with float64 autograd of reference_op on each segment's rows."""
    dtype = torch.float64
    destinations = _destinations(params)
    inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    with GradientSegments(_mask(), OFFSETS, destinations):
        y = op(*inputs, *params)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert all(p.grad is None for p in params)  # autograd did not also accumulate the full gradient
    reference = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    plain = [p.detach().to(dtype).requires_grad_() for p in params]
    y_ref = reference_op(*reference, *plain)
    y_ref.backward(grad_y.to(dtype))
    torch.testing.assert_close(y, y_ref.to(y.dtype), **tolerance)
    for t, r in zip(inputs, reference):
        if t.is_floating_point():
            torch.testing.assert_close(t.grad, r.grad.to(t.dtype), **tolerance)
    for k, (begin, end) in enumerate(_token_ranges()):
        expected = [torch.zeros_like(p) for p in plain]
        if begin != end:
            rows = [r[begin:end].detach() if r.dim() and r.shape[0] == y.shape[0] else r for r in reference]
            expected = torch.autograd.grad(reference_op(*rows, *plain), plain, grad_y[begin:end].to(dtype))
        for p, views, e in zip(params, destinations.values(), expected):
            torch.testing.assert_close(views[k], e.to(p.dtype), **tolerance)


@pytest.fixture(params=["torch", "triton"])
def kernel_choice(request, monkeypatch):
    if request.param == "triton" and not kernels.triton_available():
        pytest.skip("Triton is not installed")
    monkeypatch.setenv("MTBERT_KERNELS", request.param)
    return request.param


T, N = sum(LENGTHS), 8


def test_linear_splits_by_segment():
    x = torch.randn(T, N)
    params = [torch.randn(6, N, requires_grad=True), torch.randn(6, requires_grad=True)]
    _check_split(lambda x, w, b: kernels.linear(x, w, b), lambda x, w, b: F.linear(x, w, b), [x], params)
    _check_split(lambda x, w: kernels.linear(x, w), lambda x, w: F.linear(x, w), [x], params[:1])


def test_add_layer_norm_splits_by_segment(kernel_choice):
    x, residual = torch.randn(T, N), torch.randn(T, N)
    params = [(1 + 0.1 * torch.randn(N)).requires_grad_(), (0.1 * torch.randn(N)).requires_grad_()]
    _check_split(lambda x, r, w, b: kernels.add_layer_norm(x, r, w, b, 1e-12),
                 lambda x, r, w, b: F.layer_norm(x + r, (N,), w, b, 1e-12), [x, residual], params,
                 rtol=1e-5, atol=1e-5)


def test_bias_gelu_splits_by_segment(kernel_choice):
    _check_split(kernels.bias_gelu, lambda x, b: F.gelu(x + b), [torch.randn(T, N)],
                 [torch.randn(N, requires_grad=True)], rtol=1e-5, atol=1e-5)


def test_embedding_splits_by_segment_and_skips_the_padding_row():
    ids = torch.randint(0, 6, (T,))
    ids[3] = 0
    weight = torch.randn(6, N, requires_grad=True)
    _check_split(lambda ids, w: kernels.embedding(ids, w, padding_idx=0),
                 lambda ids, w: F.embedding(ids, w, padding_idx=0), [ids], [weight])


@pytest.mark.parametrize("unpad", [True, False])
def test_encoder_splits_its_gradients_like_one_pass_per_segment(unpad):
    """BertModel on a batch of three segments: every parameter's per-segment gradient equals a
    separate forward and backward of that segment's sequences (unpadded and padded paths)."""
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertModel(config).double()
    model.unpad = unpad
    mask = _mask()
    ids = torch.randint(1, 50, mask.shape) * mask
    types = (torch.arange(mask.shape[1]) >= 2).long() * mask

    def loss(rows):  # the last hidden states and the [CLS] pooler, as the heads read them
        out = model(ids[rows], mask[rows], types[rows])
        return (out.last_hidden_state * torch.arange(16.0, dtype=torch.float64)).sum() + out.pooler_output.sum()

    params = list(model.parameters())
    destinations = _destinations(params)
    with GradientSegments(mask, OFFSETS, destinations):
        total = loss(slice(None))
    total.backward()
    assert all(p.grad is None for p in params)
    for k, (begin, end) in enumerate(zip(OFFSETS, OFFSETS[1:])):
        expected = [torch.zeros_like(p) for p in params]
        if begin != end:
            expected = torch.autograd.grad(loss(slice(begin, end)), params)
        for (name, _), views, e in zip(model.named_parameters(), destinations.values(), expected):
            torch.testing.assert_close(views[k], e, msg=lambda m: f"segment {k}, {name}: {m}")


def test_bad_segments_are_refused():
    mask = _mask()
    with pytest.raises(ValueError, match="offsets must rise from 0 to the batch size 5"):
        GradientSegments(mask, [0, 3, 2, 5], {})
    with pytest.raises(ValueError, match="offsets must rise"):
        GradientSegments(mask, [0, 4], {})
    weight = torch.randn(3, N, requires_grad=True)
    with pytest.raises(ValueError, match=r"destinations\[.*\] has 2 tensors, expected one per segment \(3\)"):
        GradientSegments(mask, OFFSETS, {id(weight): [weight, weight]})
    with GradientSegments(mask, OFFSETS, {}):
        with pytest.raises(ValueError, match="has no gradient destinations"):
            kernels.linear(torch.randn(T, N), weight)
        with torch.no_grad():  # nothing to split: the plain op
            assert kernels.linear(torch.randn(T, N), weight).shape == (T, 3)
    with GradientSegments(mask, OFFSETS, {id(weight): [torch.zeros_like(weight)] * 3}):
        with pytest.raises(ValueError, match=r"an op input has 7 rows, none of the batch's layouts .*\[5, 14, 25\]"):
            kernels.linear(torch.randn(7, N), weight)
