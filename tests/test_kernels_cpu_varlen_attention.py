"""The packed CPU attention op (csrc/varlen_attention.cpp): output and every gradient against float64
PyTorch applying the op's own keep mask (so the backward is checked to use the forward's mask), on
awkward lengths and head sizes, the fused [T, 3, heads, head_dim] projection and other layouts,
poisoned (NaN-filled) outputs, thread counts, opcheck, the dispatcher, and bad input."""
import pytest
import torch

from mtbert import _extension, kernels
from mtbert.kernels.attention import attention_reference, varlen_attention_torch
from mtbert.kernels.varlen_attention_cpu import varlen_attention_cpu, varlen_attention_qkv_cpu

pytestmark = pytest.mark.skipif(not _extension.available(), reason="needs the compiled extension mtbert._C")

TOL = dict(atol=2e-5, rtol=2e-5)

# One token, one odd sequence, a batch mixing length 1 with 60+ (and an empty sequence), equal lengths.
LENGTHS = [[1], [7], [1, 63, 0, 2, 17], [5, 5, 5]]


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _fused_qkv(T, heads, head_dim):
    """q, k, v as the encoder makes them: one [T, 3, heads, head_dim] projection, a view of [T, 3H]."""
    return (2 * torch.randn(T, 3 * heads * head_dim)).view(T, 3, heads, head_dim).requires_grad_()


def _keep_masks(keep, lengths, heads, dropout_p):
    """The op's flat keep mask as attention_reference takes it: [heads, L, L] per sequence."""
    masks, offset = [], 0
    for L in lengths:
        size = heads * L * L
        masks.append(keep[offset:offset + size].view(heads, L, L).double() if dropout_p > 0
                     else torch.ones(heads, L, L, dtype=torch.float64))
        offset += size
    assert offset == (keep.numel() if dropout_p > 0 else offset)
    return masks


def _check_against_float64(lengths, heads, head_dim, dropout_p, scale=None, seed=17):
    cu_seqlens, T = _cu_seqlens(lengths), sum(lengths)
    qkv = _fused_qkv(T, heads, head_dim)
    out = varlen_attention_qkv_cpu(qkv, cu_seqlens, max(lengths), dropout_p, scale, seed=seed)
    op_scale = scale if scale is not None else head_dim ** -0.5
    keep = torch.ops.mtbert.varlen_attention_cpu(qkv.detach(), cu_seqlens, max(lengths), op_scale, dropout_p,
                                                 torch.tensor(seed))[2]
    reference_qkv = qkv.detach().double().requires_grad_()
    out_ref = attention_reference(*reference_qkv.unbind(1), cu_seqlens, scale,
                                  keep_mask=_keep_masks(keep, lengths, heads, dropout_p), dropout_p=dropout_p)
    assert out.shape == (T, heads, head_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), out_ref, **TOL)
    grad_out = torch.randn(T, heads, head_dim)
    out.backward(grad_out)
    out_ref.backward(grad_out.double())
    assert qkv.grad.shape == qkv.shape
    for name, index in (("q", 0), ("k", 1), ("v", 2)):
        torch.testing.assert_close(qkv.grad[:, index].double(), reference_qkv.grad[:, index], **TOL,
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_float64_with_its_own_mask(lengths, head_dim, dropout_p):
    _check_against_float64(lengths, heads=3, head_dim=head_dim, dropout_p=dropout_p)



@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_plain_loops_without_blas_match_float64(monkeypatch, dropout_p):
    """The products' stand-in for a torch whose library exports no BLAS (forced here by
    MTBERT_CPU_ATTENTION_BLAS=0), on lengths 1 to 63 and an empty sequence."""
    monkeypatch.setenv("MTBERT_CPU_ATTENTION_BLAS", "0")
    _check_against_float64([1, 63, 0, 2, 17], heads=3, head_dim=16, dropout_p=dropout_p)

def test_long_sequences_and_a_custom_scale():
    _check_against_float64([300, 129], heads=2, head_dim=32, dropout_p=0.1, scale=0.3)


def test_every_output_is_written():
    """Uninitialised memory filled with NaN (torch's deterministic mode poisons torch.empty, the
    op's allocations included): every output and gradient element must still be finite and right."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all()  # the poison is on
        _check_against_float64([1, 63, 2, 17], heads=2, head_dim=16, dropout_p=0.2)
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_the_work_without_changing_the_result(threads):
    """Sequences and heads are cut into runs of equal work per thread: every pair is computed once,
    by the same code, so any thread count gives the same bits (a run boundary inside a sequence)."""
    lengths, heads, head_dim = [1, 63, 0, 2, 17, 40], 3, 16
    cu_seqlens = _cu_seqlens(lengths)
    qkv = _fused_qkv(sum(lengths), heads, head_dim)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = varlen_attention_qkv_cpu(qkv, cu_seqlens, 63, 0.2, seed=5)
        torch.set_num_threads(threads)
        parallel = varlen_attention_qkv_cpu(qkv, cu_seqlens, 63, 0.2, seed=5)
        _check_against_float64(lengths, heads, head_dim, dropout_p=0.2)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(serial, parallel)


def test_fresh_inputs_after_longer_and_shorter_calls():
    """Per-thread scratch grows with the longest sequence and is reused: calls in a row with
    growing and shrinking lengths on fresh random inputs each stay right."""
    for lengths in ([3, 2], [70], [4, 1], [33, 9]):
        _check_against_float64(lengths, heads=2, head_dim=32, dropout_p=0.3, seed=len(lengths))


def test_separate_and_other_layouts_give_the_same_result():
    """Separate q, k, v (stacked first), a contiguous qkv, and one the op cannot read in place
    (head_dim strided: copied first); the gradients of separate q, k, v are qkv's."""
    lengths, heads, head_dim = [6, 3], 2, 16
    cu_seqlens = _cu_seqlens(lengths)
    qkv = _fused_qkv(9, heads, head_dim)
    expected = varlen_attention_qkv_cpu(qkv, cu_seqlens, 6, 0.0)
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(1))
    separate = varlen_attention_cpu(q, k, v, cu_seqlens, 6, 0.0)
    separate.backward(grad_out)
    torch.testing.assert_close(separate, expected, atol=0, rtol=0)
    torch.testing.assert_close(torch.stack([q.grad, k.grad, v.grad], dim=1), qkv.grad, atol=0, rtol=0)
    torch.testing.assert_close(varlen_attention_qkv_cpu(qkv.detach().contiguous(), cu_seqlens, 6, 0.0), expected,
                               atol=0, rtol=0)
    strided = qkv.detach().transpose(2, 3).contiguous().transpose(2, 3)  # head_dim stride 2
    assert strided.stride(3) != 1
    torch.testing.assert_close(varlen_attention_qkv_cpu(strided, cu_seqlens, 6, 0.0), expected, **TOL)


def test_dropout_keeps_one_minus_p_and_follows_torch_generator():
    lengths, heads = [64, 40, 64], 4
    cu_seqlens = _cu_seqlens(lengths)
    qkv = torch.randn(sum(lengths), 3, heads, 16)
    q, k, v = qkv.unbind(1)
    keep = torch.ops.mtbert.varlen_attention_cpu(qkv, cu_seqlens, 64, 0.25, 0.3, torch.tensor(3))[2].float()
    assert keep.numel() == heads * sum(L * L for L in lengths)
    assert abs(keep.mean().item() - 0.7) < 5 * (0.3 * 0.7 / keep.numel()) ** 0.5
    torch.manual_seed(0)
    first = varlen_attention_cpu(q, k, v, cu_seqlens, 64, 0.3)
    torch.manual_seed(0)
    assert torch.equal(varlen_attention_cpu(q, k, v, cu_seqlens, 64, 0.3), first)
    assert not torch.equal(varlen_attention_cpu(q, k, v, cu_seqlens, 64, 0.3), first)


def test_dispatcher_runs_it_on_float32_cpu_and_torch_stays_the_reference(monkeypatch):
    """kernels.varlen_attention(_qkv) on float32 CPU tensors is this op; MTBERT_KERNELS=torch
    gives the PyTorch path back, which agrees without dropout; bfloat16 keeps the PyTorch path."""
    lengths = [5, 1, 12]
    cu_seqlens = _cu_seqlens(lengths)
    qkv = torch.randn(sum(lengths), 3, 2, 16)
    q, k, v = qkv.unbind(1)
    expected = varlen_attention_qkv_cpu(qkv, cu_seqlens, 12, 0.2, 0.5, seed=_seed_after(1))
    for run in (lambda: kernels.varlen_attention_qkv(qkv, cu_seqlens, 12, 0.2, 0.5),
                lambda: kernels.varlen_attention(q, k, v, cu_seqlens, 12, 0.2, 0.5)):
        torch.manual_seed(1)
        assert torch.equal(run(), expected)
    half = [t.bfloat16() for t in (q, k, v)]
    torch.testing.assert_close(kernels.varlen_attention(*half, cu_seqlens, 12, 0.0, 0.5),
                               varlen_attention_torch(*half, cu_seqlens, 12, 0.0, 0.5), atol=0, rtol=0)
    ours = varlen_attention_qkv_cpu(qkv, cu_seqlens, 12, 0.0, 0.5)
    monkeypatch.setenv("MTBERT_KERNELS", "torch")
    reference = varlen_attention_torch(q, k, v, cu_seqlens, 12, 0.0, 0.5)
    torch.testing.assert_close(ours, reference, **TOL)
    torch.testing.assert_close(kernels.varlen_attention_qkv(qkv, cu_seqlens, 12, 0.0, 0.5), reference, atol=0, rtol=0)


def _seed_after(manual_seed):
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def test_opcheck():
    lengths = [3, 1, 5]
    cu_seqlens = _cu_seqlens(lengths)
    qkv = torch.randn(9, 3, 2, 16)
    seed = torch.tensor(9)
    for p in (0.0, 0.3):
        torch.library.opcheck(torch.ops.mtbert.varlen_attention_cpu,
                              (qkv.clone().requires_grad_(), cu_seqlens, 5, 0.25, p, seed))
        out, probs, keep = torch.ops.mtbert.varlen_attention_cpu(qkv, cu_seqlens, 5, 0.25, p, seed)
        torch.library.opcheck(torch.ops.mtbert.varlen_attention_cpu_backward,
                              (torch.randn_like(out), qkv, probs, keep, cu_seqlens, 5, 0.25, p))


def _arguments(**change):
    q, k, v = torch.randn(3, 8, 2, 16)
    return dict(q=q, k=k, v=v, cu_seqlens=_cu_seqlens([5, 3]), max_seqlen=5, dropout_p=0.1) | change


@pytest.mark.parametrize("change, argument", [
    (dict(q=torch.randn(8, 2, 16, dtype=torch.float64)), "q"),
    (dict(q=torch.randn(8, 32)), "q"),
    (dict(k=torch.randn(8, 2, 8)), "k"),
    (dict(v=torch.randn(8, 2, 16).bfloat16()), "v"),
    (dict(v=torch.randn(8, 2, 16, device="meta")), "v"),
    (dict(cu_seqlens=_cu_seqlens([5, 3]).long()), "cu_seqlens"),
    (dict(max_seqlen=0), "max_seqlen"),
    (dict(dropout_p=1.0), "dropout_p"),
])
def test_bad_input_names_the_argument(change, argument):
    with pytest.raises(ValueError, match=argument):
        varlen_attention_cpu(**_arguments(**change))


@pytest.mark.parametrize("qkv", [torch.randn(8, 2, 2, 16), torch.randn(8, 3, 32), torch.randn(8, 3, 2, 16).double()])
def test_bad_qkv_is_named(qkv):
    with pytest.raises(ValueError, match="qkv"):
        varlen_attention_qkv_cpu(qkv, _cu_seqlens([5, 3]), 5)


def test_nan_input_is_refused_in_anomaly_mode():
    q = torch.randn(8, 2, 16)
    q[3, 1, 0] = float("nan")
    with torch.autograd.set_detect_anomaly(True), pytest.raises(ValueError, match="contains NaN"):
        varlen_attention_cpu(**_arguments(q=q))


@pytest.mark.parametrize("change, argument", [
    (dict(cu_seqlens=_cu_seqlens([5, 2])), "cu_seqlens"),  # does not end at T
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), "cu_seqlens"),  # decreasing
    (dict(max_seqlen=4), "max_seqlen"),  # a sequence of 5
    (dict(qkv=torch.randn(2, 16, 3, 8).permute(3, 2, 0, 1)), "qkv"),  # token stride 1
    (dict(qkv=torch.randn(8, 3, 2, 16).half()), "qkv"),
])
def test_the_op_checks_what_the_wrapper_cannot(change, argument):
    """The C++ checks behind the wrapper: what a direct torch.ops call meets (lengths read from
    cu_seqlens' values, layouts the op cannot read in place)."""
    args = dict(qkv=torch.randn(8, 3, 2, 16), cu_seqlens=_cu_seqlens([5, 3]), max_seqlen=5) | change
    with pytest.raises(RuntimeError, match=argument):
        torch.ops.mtbert.varlen_attention_cpu(args["qkv"], args["cu_seqlens"], args["max_seqlen"], 0.25, 0.1,
                                              torch.tensor(1))
