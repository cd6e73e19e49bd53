"""Property-based tests (hypothesis, the fixed-seed profile of conftest.py) over the public API:
combine_gradients, FusedAdamW, BertModel and the kernels behind mtbert.kernels' dispatcher.

Each property: the result equals an independent reference (the per-pair vector loop,
torch.optim.AdamW, transformers.BertModel, float64 formulas), or the call raises a ValueError /
RuntimeError naming the bad argument; finite inputs give finite outputs. Each property runs at
least its stated number of examples, and each is shown to catch a planted bug: the
``test_*_catches_a_planted_bug`` tests plant one with monkeypatch and assert the property fails."""
import math
import os

import pytest
import torch
import transformers
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from mtbert import BertConfig, BertModel, kernels
from mtbert.optim import FusedAdamW, combine_gradients, combine_reference, pcgrad_orders
from mtbert.optim.combine import REFERENCE_METHODS
from mtbert.optim import combine as combine_module


# What an AssertionError of a property (not of run_property's example count) says.
PROPERTY_FAILED = "not close|non-finite|does not name|DID NOT RAISE"


def run_property(check, strategy, examples, shrink=True):
    """Runs ``check`` on at least ``examples`` cases drawn from ``strategy`` (the profile's seed)."""
    seen = []

    @settings(max_examples=examples, **({} if shrink else {"phases": (Phase.explicit, Phase.generate)}))
    @given(strategy)
    def run(case):
        seen.append(case)
        check(case)

    run()
    assert len(seen) >= examples, f"only {len(seen)} examples ran"


def assert_finite_and_close(actual, expected, atol, rtol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite output from finite inputs"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_names(error, argument):
    assert isinstance(error, (ValueError, RuntimeError)), repr(error)
    assert argument in str(error), f"the error does not name {argument!r}: {error}"


# -- combine_gradients ------------------------------------------------------------------------------

@st.composite
def gradient_cases(draw, method):
    K, P = draw(st.integers(1, 5)), draw(st.integers(1, 160))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    grads = torch.randn(K, P, generator=generator) * scale
    for k in range(1, K):  # rows that conflict exactly, agree exactly, or vanish
        kind = draw(st.sampled_from(["random", "zero", "identical", "opposite", "scaled"]))
        other = grads[draw(st.integers(0, k - 1))]
        grads[k] = {"random": grads[k], "zero": 0 * other, "identical": other, "opposite": -other,
                    "scaled": -0.5 * other}[kind]
    boundaries = None
    if draw(st.booleans()):  # a shared segment, then one head segment per task (possibly empty)
        cuts = sorted(draw(st.lists(st.integers(0, P), min_size=K, max_size=K)))
        boundaries = [0, *cuts, P]
    return dict(grads=grads, method=method, boundaries=boundaries,
                reduction=draw(st.sampled_from(["sum", "mean"])), orders=pcgrad_orders(K, generator),
                main=draw(st.integers(0, K - 1)), aux_weight=draw(st.floats(0.0, 2.0)), symmetric=draw(st.booleans()),
                scale=scale, corrupt=draw(st.sampled_from([None] * 6 + ["grads-float64", "grads-1d", "grads-strided",
                                                                         "boundaries", "out", "method"])))


def check_combine(case):
    grads, options = case["grads"], {k: case[k] for k in ("boundaries", "reduction", "orders", "main", "aux_weight",
                                                          "symmetric")}
    out = torch.empty(grads.shape[1])
    corrupt = case["corrupt"]
    if corrupt is not None:
        bad = {"grads-float64": dict(grads=grads.double()), "grads-1d": dict(grads=grads[0]),
               "grads-strided": dict(grads=torch.cat([grads, grads], 1)[:, ::2]),
               "boundaries": dict(boundaries=[0, grads.shape[1] + 1]), "out": dict(out=torch.empty(grads.shape[1] + 1)),
               "method": dict(method="pcgrad2")}[corrupt]
        arguments = {"grads": grads, "out": out, "method": case["method"], **options, **bad}
        with pytest.raises(Exception) as error:
            combine_gradients(arguments.pop("grads"), arguments.pop("out"), arguments.pop("method"), **arguments)
        assert_names(error.value, corrupt.split("-")[0])
        return
    combine_gradients(grads, out, case["method"], **options)
    expected = combine_reference(grads, case["method"], **options)
    K = grads.shape[0]
    assert_finite_and_close(out, expected, atol=1e-5 * case["scale"] * K * (1 + case["aux_weight"]), rtol=1e-5,
                            what=f"{case['method']} K={K}")


@pytest.mark.parametrize("method", REFERENCE_METHODS)
def test_combine_gradients_equals_the_per_pair_reference(method):
    run_property(check_combine, gradient_cases(method), examples=50)


def test_combine_property_catches_a_planted_bug(monkeypatch):
    monkeypatch.setattr(combine_module, "_project_conflicting", lambda coeffs, gram, i, j: None)  # never projects
    with pytest.raises(AssertionError, match=PROPERTY_FAILED):
        run_property(check_combine, gradient_cases("pcgrad"), examples=50, shrink=False)


# -- FusedAdamW -------------------------------------------------------------------------------------

@st.composite
def adamw_cases(draw):
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        shapes = draw(st.lists(st.sampled_from([(1,), (7,), (3, 5), (33,), (2, 2, 3)]), min_size=1, max_size=3))
        groups.append({"shapes": shapes, "lr": draw(st.floats(1e-4, 1e-1)),
                       "betas": (draw(st.floats(0.0, 0.99)), draw(st.floats(0.9, 0.9999))),
                       "eps": draw(st.sampled_from([1e-8, 1e-6, 1e-3])), "weight_decay": draw(st.floats(0.0, 0.5))})
    steps = draw(st.integers(1, 6))
    return dict(groups=groups, steps=steps, resume_at=draw(st.sampled_from([None, *range(1, steps)])),
                seed=draw(st.integers(0, 2 ** 31 - 1)), missing_grad=draw(st.floats(0.0, 0.4)),
                corrupt=draw(st.sampled_from([None] * 5 + ["lr", "betas", "eps", "weight_decay"])))


def _param_groups(case, tensors):
    parameters = iter(tensors)
    return [{"params": [next(parameters) for _ in g["shapes"]],
             **{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")}} for g in case["groups"]]


def check_adamw(case):
    generator = torch.Generator().manual_seed(case["seed"])
    initial = [torch.randn(s, generator=generator) for g in case["groups"] for s in g["shapes"]]
    ours = [torch.nn.Parameter(t.clone()) for t in initial]
    theirs = [torch.nn.Parameter(t.clone()) for t in initial]
    if case["corrupt"] is not None:
        groups = _param_groups(case, ours)
        groups[0][case["corrupt"]] = {"lr": -1e-3, "betas": (0.9, 1.5), "eps": -1.0, "weight_decay": math.nan}[
            case["corrupt"]]
        with pytest.raises(Exception) as error:
            FusedAdamW(groups, formula="torch")
        assert_names(error.value, case["corrupt"] if case["corrupt"] != "betas" else "beta")
        return
    optimizer = FusedAdamW(_param_groups(case, ours), formula="torch")
    reference = torch.optim.AdamW(_param_groups(case, theirs))
    for step in range(case["steps"]):
        if step == case["resume_at"]:  # a fresh optimizer over fresh parameters, from the state dict
            state = optimizer.state_dict()
            ours = [torch.nn.Parameter(p.detach().clone()) for p in ours]
            optimizer = FusedAdamW(_param_groups(case, ours), formula="torch")
            optimizer.load_state_dict(state)
        for p, q in zip(ours, theirs):
            if torch.rand((), generator=generator) < case["missing_grad"]:
                p.grad = q.grad = None  # a parameter without a gradient this step is not updated
            else:
                g = torch.randn(p.shape, generator=generator)
                p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        reference.step()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_finite_and_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-6, what=f"parameter {i}")
        if q in reference.state:
            assert_finite_and_close(optimizer.state[p]["exp_avg_sq"], reference.state[q]["exp_avg_sq"], atol=1e-7,
                                    rtol=1e-6, what=f"exp_avg_sq {i}")


def test_fused_adamw_equals_torch_adamw():
    run_property(check_adamw, adamw_cases(), examples=60)


def test_adamw_property_catches_a_planted_bug(monkeypatch):
    from mtbert.optim import adamw

    step = adamw._ops.adamw_step

    def one_step_ahead(param, exp_avg, exp_avg_sq, grad, segments, **options):  # bias correction off by one
        step(param, exp_avg, exp_avg_sq, grad, segments + torch.tensor([0, 0, 1]), **options)

    monkeypatch.setattr(adamw._ops, "adamw_step", one_step_ahead)
    with pytest.raises(AssertionError, match=PROPERTY_FAILED):
        run_property(check_adamw, adamw_cases(), examples=60, shrink=False)


# -- BertModel --------------------------------------------------------------------------------------

@st.composite
def encoder_cases(draw):
    heads = draw(st.sampled_from([1, 2]))
    config = BertConfig(vocab_size=40, hidden_size=8 * heads * draw(st.integers(1, 2)), num_attention_heads=heads,
                        num_hidden_layers=draw(st.integers(1, 2)), intermediate_size=32, max_position_embeddings=12,
                        type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    B, L = draw(st.integers(1, 4)), draw(st.integers(1, 12))  # lengths up to max_position_embeddings
    rows = []
    for _ in range(B):
        n = draw(st.integers(0, L))
        kind = draw(st.sampled_from(["right", "right", "left", "all-padding", "holes"]))
        if kind == "holes":
            rows.append(draw(st.lists(st.integers(0, 1), min_size=L, max_size=L)))
        else:
            n = 0 if kind == "all-padding" else n
            rows.append([1] * n + [0] * (L - n) if kind == "right" else [0] * (L - n) + [1] * n)
    return dict(config=config, mask=torch.tensor(rows), seed=draw(st.integers(0, 2 ** 31 - 1)),
                ids_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
                mask_dtype=draw(st.sampled_from([torch.int64, torch.bool, torch.float32])),
                corrupt=draw(st.sampled_from([None] * 6 + ["input_ids-range", "input_ids-length", "attention_mask",
                                                           "token_type_ids"])))


def check_encoder(case):
    config, mask = case["config"], case["mask"]
    generator = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    ours = BertModel(config).eval()
    input_ids = torch.randint(0, config.vocab_size, mask.shape, generator=generator, dtype=case["ids_dtype"])
    token_type_ids = torch.randint(0, 2, mask.shape, generator=generator, dtype=case["ids_dtype"])
    mask = mask.to(case["mask_dtype"])
    if case["corrupt"] is not None:
        B, L = mask.shape
        bad = {"input_ids-range": dict(input_ids=input_ids + config.vocab_size),
               "input_ids-length": dict(input_ids=torch.zeros(B, config.max_position_embeddings + 1, dtype=torch.long)),
               "attention_mask": dict(attention_mask=mask[:, :-1] if L > 1 else mask[None]),
               "token_type_ids": dict(token_type_ids=token_type_ids + 2)}[case["corrupt"]]
        arguments = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids, **bad}
        with pytest.raises(Exception) as error:
            ours(**arguments)
        assert_names(error.value, case["corrupt"].split("-")[0])
        return
    theirs = transformers.BertModel(transformers.BertConfig(**config.to_dict(), attn_implementation="eager")).eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    with torch.no_grad():
        got = ours(input_ids, mask, token_type_ids)
        want = theirs(input_ids=input_ids.long(), attention_mask=mask.long(), token_type_ids=token_type_ids.long())
    real = mask.bool()
    assert torch.isfinite(got.last_hidden_state).all() and torch.isfinite(got.pooler_output).all(), "non-finite"
    assert_finite_and_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-5, rtol=0,
                            what="last_hidden_state at real tokens")
    first_real = real[:, 0]
    assert_finite_and_close(got.pooler_output[first_real], want.pooler_output[first_real], atol=1e-5, rtol=0,
                            what="pooler_output")


def test_bert_model_equals_transformers():
    run_property(check_encoder, encoder_cases(), examples=40)


def test_encoder_property_catches_a_planted_bug(monkeypatch):
    from mtbert import model

    # Treats any mask as right-padded with its number of ones: wrong for left padding and holes.
    monkeypatch.setattr(model, "_right_padded_lengths", lambda mask: mask.sum(1) if mask.sum(1).min() > 0 else None)
    with pytest.raises(AssertionError, match=PROPERTY_FAILED):
        run_property(check_encoder, encoder_cases(), examples=40, shrink=False)


# -- the kernels, through the dispatcher ------------------------------------------------------------

KERNEL_OPS = ("add_layer_norm", "bias_gelu", "varlen_attention")


@st.composite
def kernel_cases(draw, op, backend):
    lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    return dict(op=op, backend=backend, rows=draw(st.integers(1, 5)),
                width=draw(st.integers(1, 40)), lengths=lengths, heads=draw(st.integers(1, 2)),
                head_dim=draw(st.sampled_from([8, 16, 32])), scale=draw(st.sampled_from([1e-2, 1.0, 1e2])),
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _attention_float64(q, k, v, lengths):
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].double().transpose(0, 1) for t in (q, k, v))  # (heads, n, d)
        probs = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out.append((probs @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


def check_kernel(case):
    generator = torch.Generator().manual_seed(case["seed"])

    def randn(*shape):  # in the case's dtype; the float64 references see these rounded values
        return (torch.randn(*shape, generator=generator) * case["scale"]).to(case["dtype"])

    os.environ["MTBERT_KERNELS"] = case["backend"]
    try:
        if case["op"] == "add_layer_norm":
            x, residual = randn(case["rows"], case["width"]), randn(case["rows"], case["width"])
            weight, bias = randn(case["width"]), randn(case["width"])
            got = kernels.add_layer_norm(x, residual, weight, bias, 1e-5)
            expected = torch.nn.functional.layer_norm(x.double() + residual.double(), (case["width"],),
                                                      weight.double(), bias.double(), 1e-5)
            tolerance = 1e-4 * max(1.0, weight.abs().max().item()) + 1e-5 * bias.abs().max().item()
        elif case["op"] == "bias_gelu":
            x, bias = randn(case["rows"], case["width"]), randn(case["width"])
            got = kernels.bias_gelu(x, bias)
            expected = torch.nn.functional.gelu(x.double() + bias.double())
            tolerance = 1e-5 * max(1.0, expected.abs().max().item())
        else:
            lengths, T = case["lengths"], sum(case["lengths"])
            q, k, v = ((randn(T, case["heads"], case["head_dim"]) / case["scale"]).to(case["dtype"]) for _ in range(3))
            cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            if case["backend"] == "triton" and case["head_dim"] not in (16, 32, 64, 128):
                with pytest.raises(Exception) as error:
                    kernels.varlen_attention(q, k, v, cu_seqlens, max(lengths))
                assert_names(error.value, "head_dim")
                return
            got = kernels.varlen_attention(q, k, v, cu_seqlens, max(lengths))
            expected = _attention_float64(q, k, v, lengths)
            tolerance = 1e-4 * max(1.0, v.abs().max().item())
    finally:
        del os.environ["MTBERT_KERNELS"]
    assert got.dtype == case["dtype"], f"{case['op']} returned {got.dtype} for {case['dtype']} inputs"
    # Half precision: a few roundings of the output's size on top (the result is stored in that dtype).
    rounding = 0.0 if case["dtype"] == torch.float32 else 8 * torch.finfo(case["dtype"]).eps
    assert_finite_and_close(got, expected, atol=tolerance + rounding * expected.abs().max().item(),
                            rtol=1e-4 + rounding, what=f"{case['op']} ({case['backend']}, {case['dtype']})")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_kernels_equal_float64_formulas(op, backend):
    run_property(check_kernel, kernel_cases(op, backend), examples=16)


def test_kernel_property_catches_a_planted_bug(monkeypatch):
    import importlib

    def tanh_gelu(x, bias):  # the tanh approximation instead of the exact erf GELU
        return torch.nn.functional.gelu(x + bias, approximate="tanh")

    module = importlib.import_module("mtbert.kernels.bias_gelu")  # mtbert.kernels.bias_gelu is also the function
    monkeypatch.setattr(module, "bias_gelu_reference", tanh_gelu)
    monkeypatch.setattr(module, "bias_gelu_triton", tanh_gelu)
    with pytest.raises(AssertionError, match=PROPERTY_FAILED):
        run_property(check_kernel, kernel_cases("bias_gelu", "torch"), examples=10, shrink=False)
