"""The varlen FlashAttention-2 Triton kernels (interpreted on the CPU) and the CPU PyTorch path,
against a float64 per-sequence matmul-softmax-matmul reference."""
import pytest
import torch

from kernel_testing import DEVICE, DTYPE_TOLERANCES, leaf, nan_poisoned_allocations
from mtbert import kernels
from mtbert.kernels.attention import (attention_forward, attention_reference, padded_attention_torch, padding_groups,
                                      padded_attention_triton, varlen_attention_torch, varlen_attention_triton)

# (lengths, heads): batch 1–3, heads 1–4, lengths 1…70 mixed, none a multiple of the block size.
BATCHES = [([1, 70, 17], 3), ([33], 1), ([5, 64], 4), ([2, 1, 49], 2), ([70], 4), ([29, 3], 1)]


def cu_seqlens_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def packed_inputs(lengths, heads, head_dim, dtype):
    T = sum(lengths)
    return [torch.randn(T, heads, head_dim, dtype=torch.float64).to(DEVICE, dtype) for _ in range(3)]


def assert_grads_close(ours, reference, atol, rtol):
    for name, a, b in zip("qkv", ours, reference):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d{name}: {m}")


def assert_within_twice_low_precision_error(ours, exact, low_precision, name, floor=1e-5):
    """FlashAttention's own test criterion: the kernel's largest error against float64 is at most
    twice that of the plain PyTorch reference run in the input dtype (plus a small floor)."""
    error = (ours.double() - exact).abs().max().item()
    baseline = (low_precision.double() - exact).abs().max().item()
    assert error <= 2 * baseline + floor, f"{name}: error {error:.3g}, PyTorch in the same dtype {baseline:.3g}"


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("head_dim", [32, 64])
def test_varlen_matches_float64_reference(head_dim, dtype, atol, rtol):
    """Against float64 with the dtype's tolerance, and (the stricter test for float16/bfloat16,
    whose gradients sum many rounded products) within twice the error of PyTorch in that dtype."""
    lengths, heads = BATCHES[(head_dim // 32 + 2 * [torch.float32, torch.float16, torch.bfloat16].index(dtype)) % 6]
    cu_seqlens = cu_seqlens_of(lengths)
    inputs = [leaf(t) for t in packed_inputs(lengths, heads, head_dim, dtype)]
    grad_out = torch.randn(sum(lengths), heads, head_dim, dtype=torch.float64).to(DEVICE, dtype)
    scale = 0.3
    with nan_poisoned_allocations():
        out = varlen_attention_triton(*inputs, cu_seqlens, max(lengths), softmax_scale=scale)
        out.backward(grad_out)
    reference = [leaf(t, torch.float64) for t in inputs]
    out_ref = attention_reference(*reference, cu_seqlens=cu_seqlens, softmax_scale=scale)
    out_ref.backward(grad_out.double())
    low = [leaf(t) for t in inputs]
    out_low = attention_reference(*low, cu_seqlens=cu_seqlens, softmax_scale=scale)
    out_low.backward(grad_out)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    torch.testing.assert_close(out.double(), out_ref, atol=atol, rtol=rtol)
    assert_within_twice_low_precision_error(out, out_ref, out_low, "out")
    for name, a, b, c in zip("qkv", inputs, reference, low):
        assert_within_twice_low_precision_error(a.grad, b.grad, c.grad, f"d{name}")
        if dtype == torch.float32:
            torch.testing.assert_close(a.grad.double(), b.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, head_dim, key_lengths", [
    (torch.float32, 32, [37, 1, 0]),
    (torch.bfloat16, 64, [20, 37]),
], ids=["float32-with-empty-row", "bfloat16"])
def test_padded_ignores_padding_keys(dtype, head_dim, key_lengths):
    """Keys and values past each key length are NaN: nothing may read them. Every query row is
    computed; a sequence without keys gives zeros and zero gradients."""
    B, L, heads = len(key_lengths), 37, 2
    atol = rtol = 2e-5 if dtype == torch.float32 else 4e-2
    q, k, v = (torch.randn(B, L, heads, head_dim, dtype=torch.float64).to(DEVICE, dtype) for _ in range(3))
    lengths = torch.tensor(key_lengths, dtype=torch.int32, device=DEVICE)
    for t in (k, v):
        for b, n in enumerate(key_lengths):
            t[b, n:] = float("nan")
    inputs = [leaf(t) for t in (q, k, v)]
    grad_out = torch.randn(B, L, heads, head_dim).to(DEVICE, dtype)
    with nan_poisoned_allocations():
        out = padded_attention_triton(*inputs, lengths)
        out.backward(grad_out)
    reference = [leaf(t, torch.float64) for t in inputs]
    out_ref = attention_reference(*reference, key_lengths=lengths)
    out_ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(inputs[0].grad.double(), reference[0].grad, atol=atol, rtol=rtol)
    for ours, theirs in zip(inputs[1:], reference[1:]):
        for b, n in enumerate(key_lengths):
            torch.testing.assert_close(ours.grad[b, :n].double(), theirs.grad[b, :n], atol=atol, rtol=rtol)
            assert (ours.grad[b, n:] == 0).all()


def dropout_keep_mask(lengths, heads, dropout_p, seed):
    """The kernel's keep mask, read back through the kernel itself: with q = k = 0 every
    probability is 1/len, and with v[j] the one-hot of key position j, out[i, j] is
    keep[i, j] / (len · (1 - p)). Returns one [heads, len, len] bool mask per sequence."""
    head_dim = 64
    cu_seqlens = cu_seqlens_of(lengths)
    T = sum(lengths)
    q = torch.zeros(T, heads, head_dim, device=DEVICE)
    v = torch.zeros(T, heads, head_dim, device=DEVICE)
    for start, n in zip(cu_seqlens[:-1].tolist(), lengths):
        v[start + torch.arange(n), :, torch.arange(n)] = 1.0
    out, _ = attention_forward(q, q.clone(), v, cu_seqlens, max(lengths), dropout_p=dropout_p, seed=seed)
    masks = []
    for start, n in zip(cu_seqlens[:-1].tolist(), lengths):
        piece = out[start:start + n, :, :n].transpose(0, 1)  # (heads, len, len)
        expected = 1.0 / (n * (1 - dropout_p))
        kept = piece > 0
        torch.testing.assert_close(piece[kept], torch.full_like(piece[kept], expected))
        masks.append(kept)
    return masks


def test_dropout_same_mask_in_forward_and_backward():
    """Output and all gradients match the reference that applies the kernel's own mask: the
    backward regenerates exactly the forward's mask from the seed."""
    lengths, heads, p, seed = [64, 23, 1], 2, 0.3, 1234
    cu_seqlens = cu_seqlens_of(lengths)
    masks = dropout_keep_mask(lengths, heads, p, seed)
    inputs = [leaf(t) for t in packed_inputs(lengths, heads, 64, torch.float32)]
    grad_out = torch.randn(sum(lengths), heads, 64, device=DEVICE)
    out = varlen_attention_triton(*inputs, cu_seqlens, max(lengths), dropout_p=p, seed=seed)
    out.backward(grad_out)
    reference = [leaf(t, torch.float64) for t in inputs]
    out_ref = attention_reference(*reference, cu_seqlens=cu_seqlens, keep_mask=masks, dropout_p=p)
    out_ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), out_ref, atol=2e-5, rtol=2e-5)
    assert_grads_close(inputs, reference, 2e-5, 2e-5)
    # A different seed gives a different mask; the same seed the same one.
    assert not all(torch.equal(a, b) for a, b in zip(masks, dropout_keep_mask(lengths, heads, p, seed + 1)))
    assert all(torch.equal(a, b) for a, b in zip(masks, dropout_keep_mask(lengths, heads, p, seed)))


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p(dropout_p):
    masks = dropout_keep_mask([64] * 4, 4, dropout_p, seed=7)  # 65,536 probabilities
    kept = torch.cat([m.reshape(-1) for m in masks]).float().mean().item()
    assert abs(kept - (1 - dropout_p)) < 0.01 * (1 - dropout_p)


def test_dropout_seed_comes_from_torch_generator():
    lengths, heads = [9, 4], 2
    inputs = packed_inputs(lengths, heads, 32, torch.float32)
    cu_seqlens = cu_seqlens_of(lengths)
    torch.manual_seed(5)
    first = varlen_attention_triton(*inputs, cu_seqlens, 9, dropout_p=0.5)
    torch.manual_seed(5)
    torch.testing.assert_close(varlen_attention_triton(*inputs, cu_seqlens, 9, dropout_p=0.5), first, atol=0, rtol=0)
    assert not torch.equal(varlen_attention_triton(*inputs, cu_seqlens, 9, dropout_p=0.5), first)


@pytest.mark.parametrize("head_dim", [7, 32])
def test_cpu_path_matches_float64_reference(head_dim):
    """The PyTorch varlen path (SDPA per length bucket) used on the CPU, any head size."""
    lengths, heads = [1, 70, 17, 17, 5], 3
    cu_seqlens = cu_seqlens_of(lengths)
    inputs = [leaf(t) for t in packed_inputs(lengths, heads, head_dim, torch.float32)]
    grad_out = torch.randn(sum(lengths), heads, head_dim, device=DEVICE)
    out = varlen_attention_torch(*inputs, cu_seqlens, 70)
    out.backward(grad_out)
    reference = [leaf(t, torch.float64) for t in inputs]
    out_ref = attention_reference(*reference, cu_seqlens=cu_seqlens)
    out_ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), out_ref, atol=2e-5, rtol=2e-5)
    assert_grads_close(inputs, reference, 2e-5, 2e-5)


def test_cpu_path_pads_runs_of_different_lengths_separately():
    """A packed batch whose sequences come in runs of very different lengths is padded run by run
    (less padded work than padding everything to the longest) with the same result."""
    lengths = [3, 4, 3, 5, 2, 130, 3, 4, 3, 5, 2]
    assert padding_groups(tuple(lengths)) == ((0, 5), (5, 6), (6, 11))
    assert padding_groups((10,) * 300) == ((0, 256), (256, 300))  # runs are at most 256 sequences
    cu_seqlens = cu_seqlens_of(lengths)
    inputs = [leaf(t) for t in packed_inputs(lengths, 2, 8, torch.float32)]
    grad_out = torch.randn(sum(lengths), 2, 8, device=DEVICE)
    varlen_attention_torch(*inputs, cu_seqlens, 130).backward(grad_out)
    reference = [leaf(t, torch.float64) for t in inputs]
    out_ref = attention_reference(*reference, cu_seqlens=cu_seqlens)
    out_ref.backward(grad_out.double())
    assert_grads_close(inputs, reference, 2e-5, 2e-5)


def test_cpu_path_dropout_statistics():
    """With dropout the CPU path keeps each probability with 1 − p, scaled by 1/(1 − p): the mean
    output over many draws approaches the dropout-free output."""
    lengths, heads = [6, 3], 2
    q, k, v = packed_inputs(lengths, heads, 8, torch.float64)
    cu_seqlens = cu_seqlens_of(lengths)
    draws = torch.stack([varlen_attention_torch(q, k, v, cu_seqlens, 6, dropout_p=0.4) for _ in range(4000)])
    exact = varlen_attention_torch(q, k, v, cu_seqlens, 6)
    standard_error = draws.std(0) / 4000 ** 0.5
    assert ((draws.mean(0) - exact).abs() <= 5 * standard_error + 1e-9).all()


def test_padded_cpu_path_matches_reference():
    key_lengths = torch.tensor([5, 0, 11], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(3, 11, 2, 16, dtype=torch.float64, device=DEVICE) for _ in range(3))
    torch.testing.assert_close(padded_attention_torch(q, k, v, key_lengths),
                               attention_reference(q, k, v, key_lengths=key_lengths))


def test_dispatch_override(monkeypatch):
    lengths = [4, 9]
    inputs = packed_inputs(lengths, 2, 32, torch.float32)
    cu_seqlens = cu_seqlens_of(lengths)
    monkeypatch.setenv("MTBERT_KERNELS", "torch")
    assert not kernels.use_triton(inputs[0])
    expected = kernels.varlen_attention(*inputs, cu_seqlens, 9)
    monkeypatch.setenv("MTBERT_KERNELS", "triton")
    assert kernels.use_triton(inputs[0])
    torch.testing.assert_close(kernels.varlen_attention(*inputs, cu_seqlens, 9), expected)
    monkeypatch.setenv("MTBERT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MTBERT_KERNELS"):
        kernels.use_triton(inputs[0])


def _bad(**changes):
    args = dict(q=torch.randn(10, 2, 32), k=torch.randn(10, 2, 32), v=torch.randn(10, 2, 32),
                cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=6)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, argument", [
    (_bad(q=torch.randn(10, 2, 32, dtype=torch.float64)), "q"),
    (_bad(q=torch.randn(10, 32)), "q"),
    (_bad(k=torch.randn(10, 2, 32).transpose(0, 1).contiguous().transpose(0, 1)), "k"),
    (_bad(v=torch.randn(10, 2, 32, dtype=torch.float16)), "v"),
    (_bad(v=torch.randn(10, 2, 32, device="meta")), "v"),
    (_bad(cu_seqlens=torch.tensor([0, 4, 10])), "cu_seqlens"),
    (_bad(max_seqlen=6.0), "max_seqlen"),
    (_bad(q=torch.randn(10, 2, 48), k=torch.randn(10, 2, 48), v=torch.randn(10, 2, 48)), "head_dim"),
    (_bad(dropout_p=1.0), "dropout_p"),
    (_bad(softmax_scale=-1.0), "softmax_scale"),
], ids=["q-dtype", "q-dims", "k-non-contiguous", "v-dtype", "v-device", "cu_seqlens-dtype", "max_seqlen",
        "head_dim", "dropout_p", "softmax_scale"])
def test_bad_inputs_raise_value_error_naming_the_argument(args, argument):
    args = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) and value.device.type != "meta" else value
            for name, value in args.items()}
    with pytest.raises(ValueError, match=argument):
        varlen_attention_triton(**args)


def test_nan_input_raises_under_anomaly_detection():
    args = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
            for name, value in _bad(k=torch.full((10, 2, 32), float("nan"))).items()}
    with torch.autograd.set_detect_anomaly(True), pytest.raises(ValueError, match="k contains NaN"):
        varlen_attention_triton(**args)
