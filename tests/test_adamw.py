"""FusedAdamW (mtbert.optim.adamw + the adamw_step op) against torch.optim.AdamW ("torch" formula)
and against a plain float64 implementation of the CS224N handout's formula ("handout")."""
import io

import pytest
import torch

from mtbert import _extension

pytestmark = pytest.mark.skipif(not _extension.available(), reason="mtbert._C is not built")

from mtbert.optim import FusedAdamW, adamw_reference  # noqa: E402
from mtbert.optim import _ops  # noqa: E402


@pytest.fixture
def one_thread():
    """Long loops of tiny ops: a thread team per op only adds waiting, the more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.LayerNorm(31), torch.nn.Tanh(), torch.nn.Linear(31, 3))


def decay_groups(model: torch.nn.Module, weight_decay: float):
    """The usual BERT split: no decay on biases and LayerNorm weights, different lr."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0, "lr": 2e-3}]


def torch_formula_matches_torch_adamw(steps: int, device=torch.device("cpu")) -> FusedAdamW:
    """FusedAdamW (formula "torch") and torch.optim.AdamW train the same small model on ``device``
    for ``steps`` steps; checks that the weights agree and returns FusedAdamW."""
    ours, theirs = small_model().to(device), small_model().to(device)
    opt_ours = FusedAdamW(decay_groups(ours, 0.05), lr=1e-3, eps=1e-8, formula="torch")
    opt_theirs = torch.optim.AdamW(decay_groups(theirs, 0.05), lr=1e-3, eps=1e-8)
    teacher = small_model(seed=7).to(device)  # a regression target keeps the weights O(1), away from a noisy optimum
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 13, generator=gen).to(device)
        with torch.no_grad():
            y = teacher(x)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6 * q.abs().max().item())
    return opt_ours


def test_torch_formula_matches_torch_adamw_over_1000_steps(one_thread):
    torch_formula_matches_torch_adamw(steps=1000)


def steps_match_float64_formula(params, hyper: dict, steps: int) -> FusedAdamW:
    """Takes ``steps`` FusedAdamW steps on ``params`` (any device) with seeded random gradients, one
    step's all zero, and checks them against adamw_reference in float64 on the CPU; returns the optimizer."""
    reference = [p.detach().cpu().double() for p in params]
    moments = [(torch.zeros_like(r), torch.zeros_like(r)) for r in reference]
    opt = FusedAdamW(params, **hyper)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        for p, r, (m, v) in zip(params, reference, moments):
            g = torch.randn(p.shape, generator=gen) * (0.0 if step == 3 else 1.0)  # one all-zero gradient step
            p.grad.copy_(g)
            adamw_reference(r, g.double(), m, v, step, **hyper)
        opt.step()
    for p, r in zip(params, reference):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().cpu().double(), r, rtol=1e-5, atol=1e-6)
    return opt


# torch's formula always corrects the bias, so it has no correct_bias=False case.
@pytest.mark.parametrize("formula, correct_bias", [("handout", True), ("handout", False), ("torch", True)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_float64_formula(formula, correct_bias, weight_decay):
    shapes = [(1,), (17,), (3, 5), (1000,)]  # length 1, odd sizes, one longer than a vector
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    hyper = dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay, correct_bias=correct_bias,
                 formula=formula)
    opt = steps_match_float64_formula(params, hyper, steps=50)
    padding = opt.flat.params[opt.flat.span(params[0])[1]:opt.flat.span(params[1])[0]]
    assert padding.numel() > 0 and (padding == 0).all()


def test_parameters_without_gradient_are_skipped():
    used, unused = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(7))
    opt = FusedAdamW([used, unused], lr=0.1, weight_decay=0.1)
    before = unused.detach().clone()
    used.sum().backward()
    unused.grad = None  # as after nn.Module.zero_grad(set_to_none=True) with the parameter unused
    opt.step()
    assert torch.equal(unused, before)
    assert opt.state[used]["step"].item() == 1 and opt.state[unused]["step"].item() == 0
    assert not torch.equal(used, used.detach() * 0 + before[0])


def test_stray_gradient_is_adopted_into_the_buffer():
    model = small_model()
    reference = small_model()
    opt = FusedAdamW(model.parameters(), lr=1e-2, eps=1e-8, weight_decay=1e-2, formula="torch")
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    x = torch.randn(4, 13)
    for m, o in ((model, opt), (reference, opt_ref)):
        m.zero_grad(set_to_none=True)  # detaches .grad from the flat buffer: backward makes new tensors
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert opt.flat.is_intact() and all(p.grad.data_ptr() != 0 for p in model.parameters())


def run(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 13, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("formula", ["handout", "torch"])
def test_state_dict_resume_is_bit_identical(formula, one_thread):
    model = small_model()
    opt = FusedAdamW(decay_groups(model, 0.01), lr=1e-2, formula=formula)
    run(model, opt, 20, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    run(model, opt, 100, seed=2)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = small_model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = FusedAdamW(decay_groups(resumed, 0.01), lr=1e-2, formula=formula)
    opt2.load_state_dict(saved["optim"])
    run(resumed, opt2, 100, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_bad_hyperparameters_name_the_argument():
    p = [torch.nn.Parameter(torch.randn(3))]
    for kwargs, message in [({"lr": -1.0}, "lr must be"), ({"betas": (1.0, 0.9)}, "betas must be"),
                            ({"eps": float("nan")}, "eps must be"), ({"weight_decay": -0.1}, "weight_decay must be"),
                            ({"formula": "adam"}, "formula must be one of"),
                            ({"formula": "torch", "correct_bias": False}, "correct_bias=False")]:
        with pytest.raises(ValueError, match=message):
            FusedAdamW(p, **kwargs)


def test_op_bad_inputs_name_the_argument():
    n = 10
    buf = lambda: torch.zeros(n)  # noqa: E731
    seg = torch.tensor([[0, n, 1]])
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, True, "torch")
    cases = [
        ((buf().double(), buf(), buf(), buf(), seg) + hyper, "param must be float32"),
        ((buf(), torch.zeros(n + 1), buf(), buf(), seg) + hyper, "exp_avg must have 10 elements"),
        ((buf(), buf(), buf(), torch.zeros(2 * n)[::2], seg) + hyper, "grad must be contiguous"),
        ((buf(), buf(), buf(), torch.zeros(n, device="meta"), seg) + hyper, "grad must be on the same device"),
        ((buf(), buf(), buf(), buf(), torch.tensor([[0, 6, 1], [4, n, 1]])) + hyper, "segments must be sorted"),
        ((buf(), buf(), buf(), buf(), torch.tensor([[0, n, 0]])) + hyper, "segments step must be >= 1"),
        ((buf(), buf(), buf(), buf(), seg.int()) + hyper, "segments must be int64"),
        ((buf(), buf(), buf(), buf(), seg, float("nan")) + hyper[1:], "lr must be finite"),
        ((buf(), buf(), buf(), buf(), seg) + hyper[:-1] + ("adam",), "formula must be 'handout' or 'torch'"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.mtbert.adamw_step(*args)


def test_opcheck():
    n = 37
    args = (torch.randn(n), torch.randn(n), torch.rand(n), torch.randn(n), torch.tensor([[0, 20, 3], [24, 37, 1]]),
            1e-3, 0.9, 0.999, 1e-6, 0.01, True, "handout")
    torch.library.opcheck(torch.ops.mtbert.adamw_step.default, args)


@pytest.mark.parametrize("cut", [0, 48, 77, 208])
def test_two_shards_update_as_the_whole_buffer_and_save_its_state(cut, one_thread):
    """Two optimizers over the columns [0, cut) and [cut, P) of one flat buffer (what two ranks hold)
    step like one unsharded optimizer (bit for bit when the cut is aligned to the kernel's vectors,
    as mtbert.distributed's shards are); their gathered state_dict is the unsharded one's and loads
    into an unsharded optimizer and back into shards."""
    def same(a, b):
        if cut % 16 == 0:
            return torch.equal(a, b)
        return torch.allclose(a, b, rtol=1e-6, atol=1e-9)

    reference, sharded = small_model(), small_model()
    full = FusedAdamW(decay_groups(reference, 0.01), lr=1e-2)
    numel = FusedAdamW(decay_groups(small_model(), 0.01)).flat.numel
    shards = []

    def gather(local):  # what the all-gather of the ranks' shards gives
        name = "exp_avg" if any(local is s.exp_avg for s in shards) else "exp_avg_sq"
        return torch.cat([getattr(s, name) for s in shards])

    groups = decay_groups(sharded, 0.01)
    shards += [FusedAdamW(groups, lr=1e-2, shard=(0, cut), gather_shards=gather),
               FusedAdamW(groups, lr=1e-2, shard=(cut, numel), gather_shards=gather)]
    assert [s.exp_avg.numel() for s in shards] == [cut, numel - cut]
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        x = torch.randn(8, 13, generator=gen)
        for model, optimizers in ((reference, [full]), (sharded, shards)):
            model(x).pow(2).mean().backward()
            for optimizer in optimizers:
                optimizer.step()
            optimizers[0].zero_grad()
    for p, q in zip(reference.parameters(), sharded.parameters()):
        assert same(p, q)
    saved = shards[0].state_dict()
    expected = full.state_dict()
    for index, state in expected["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert same(saved["state"][index][key], state[key]), (index, key)
    unsharded = FusedAdamW(decay_groups(small_model(), 0.01), lr=1e-2)
    unsharded.load_state_dict(saved)
    assert same(unsharded.exp_avg, full.exp_avg)
    shard = FusedAdamW(decay_groups(small_model(), 0.01), lr=1e-2, shard=(cut, numel), gather_shards=gather)
    shard.load_state_dict(expected)
    assert torch.equal(shard.exp_avg_sq, full.exp_avg_sq[cut:])  # copied


def test_bad_shard_names_the_argument():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"shard must be \(begin, end\) with 0 <= begin <= end <= 16"):
        FusedAdamW(p, shard=(0, 17), gather_shards=lambda t: t)
    with pytest.raises(ValueError, match="shard and gather_shards go together"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3))], shard=(0, 16))
