"""The kernels as PyTorch custom ops: torch.library.opcheck on each op (Triton interpreted on the
CPU), and torch.compile(BertModel, fullgraph=True) without graph breaks, equal to eager, with the
Triton ops (aot_eager) and with the PyTorch path (inductor)."""
import pytest
import torch

from kernel_testing import DEVICE
from mtbert import BertConfig, BertModel
from mtbert.kernels._triton import INTERPRETED

pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and not INTERPRETED, reason="needs a GPU or TRITON_INTERPRET=1")


def test_opcheck_add_layer_norm():
    x, residual = torch.randn(5, 48, device=DEVICE), torch.randn(5, 48, device=DEVICE)
    weight, bias = torch.randn(48, device=DEVICE), torch.randn(48, device=DEVICE)
    for r in (residual, None):
        args = [None if t is None else t.clone().requires_grad_() for t in (x, r, weight, bias)]
        torch.library.opcheck(torch.ops.mtbert.add_layer_norm, (*args, 1e-5))
    y, mean, rstd = torch.ops.mtbert.add_layer_norm(x, residual, weight, bias, 1e-5)
    torch.library.opcheck(torch.ops.mtbert.add_layer_norm_backward,
                          (torch.randn_like(y), x, residual, weight, mean, rstd))


def test_opcheck_bias_gelu():
    x, bias = torch.randn(6, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    torch.library.opcheck(torch.ops.mtbert.bias_gelu, (x.clone().requires_grad_(), bias.clone().requires_grad_()))
    torch.library.opcheck(torch.ops.mtbert.bias_gelu_backward, (torch.randn_like(x), x, bias))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck_varlen_attention(dropout_p):
    q, k, v = (torch.randn(11, 2, 16, device=DEVICE) for _ in range(3))
    cu_seqlens = torch.tensor([0, 4, 11], dtype=torch.int32, device=DEVICE)
    seed = torch.tensor(7)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.mtbert.varlen_attention, (*inputs, cu_seqlens, 7, 0.25, dropout_p, seed))
    out, lse = torch.ops.mtbert.varlen_attention(q, k, v, cu_seqlens, 7, 0.25, dropout_p, seed)
    torch.library.opcheck(torch.ops.mtbert.varlen_attention_backward,
                          (torch.randn_like(out), q, k, v, out, lse, cu_seqlens, 7, 0.25, dropout_p, seed))


def tiny_model():
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config).to(DEVICE)


def right_padded(lengths, L):
    input_ids = torch.randint(1, 50, (len(lengths), L), device=DEVICE)
    attention_mask = (torch.arange(L, device=DEVICE) < torch.tensor(lengths, device=DEVICE)[:, None]).long()
    return input_ids * attention_mask, attention_mask


def outputs_and_grads(forward, model, input_ids, attention_mask):
    """``forward`` (the model or its compiled version) on the batch; the gradients of ``model``."""
    model.zero_grad()
    out = forward(input_ids, attention_mask)
    loss = (out.last_hidden_state * attention_mask[..., None]).square().sum() + out.pooler_output.sum()
    loss.backward()
    return out.last_hidden_state.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kernels, backend", [("triton", "aot_eager"), ("torch", "inductor")])
def test_compiled_model_has_no_graph_break_and_matches_eager(kernels, backend, monkeypatch):
    """fullgraph=True traces the whole model (unpadded path: packed tokens, the custom ops or the
    PyTorch attention); outputs and every parameter gradient equal eager; a new sequence length
    (a new max_seqlen) reuses the compiled graph, as the length is marked dynamic."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("MTBERT_KERNELS", kernels)
    torch._dynamo.reset()
    model = tiny_model()
    batch = right_padded([9, 4, 6], 9)
    # The unpadded path's token count is data-dependent (nonzero on the mask).
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explanation = torch._dynamo.explain(model)(*batch)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for lengths, L in (([9, 4, 6], 9), ([3, 13, 7], 13)):
            input_ids, attention_mask = right_padded(lengths, L)
            torch._dynamo.mark_dynamic(input_ids, 1)
            torch._dynamo.mark_dynamic(attention_mask, 1)
            hidden, grads = outputs_and_grads(compiled, model, input_ids, attention_mask)
            hidden_eager, grads_eager = outputs_and_grads(model, model, input_ids, attention_mask)
            torch.testing.assert_close(hidden, hidden_eager, atol=1e-5, rtol=1e-5)
            for name, grad in grads_eager.items():  # 1e-5 of each gradient's scale: inductor reorders sums
                torch.testing.assert_close(grads[name], grad, atol=1e-5 * max(1.0, grad.abs().max().item()), rtol=1e-5,
                                           msg=lambda m, n=name: f"{n}: {m}")
    assert counter.frame_count == 1


def test_compiled_model_rejects_what_eager_rejects(monkeypatch):
    """Compiled, the model cannot branch on values: a mask it cannot unpad (eager would take the
    padded path) and out-of-range ids (eager: ValueError) fail loudly in the graph."""
    monkeypatch.setenv("MTBERT_KERNELS", "torch")
    torch._dynamo.reset()
    model = tiny_model()
    input_ids, attention_mask = right_padded([5, 3], 5)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        compiled(input_ids, attention_mask)
        with pytest.raises(RuntimeError, match="right-padded"):
            compiled(input_ids, attention_mask.flip(1))
        with pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, 50\)"):
            compiled(input_ids + 50, attention_mask)
