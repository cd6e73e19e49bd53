"""FlatParameters: parameters as views of one buffer, per-task gradient rows filled by autograd,
model state_dict round trips, GradScaler, and a full multitask step against plain autograd."""
import io

import pytest
import torch

from mtbert import _extension

pytestmark = pytest.mark.skipif(not _extension.available(), reason="mtbert._C is not built")

from mtbert.optim import ALIGNMENT, FlatParameters, FusedAdamW, combine_reference  # noqa: E402

TASKS = ("sst", "para", "sts")


class TinyMultitask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(7, 11), torch.nn.LayerNorm(11), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({"sst": torch.nn.Linear(11, 5), "para": torch.nn.Linear(11, 1),
                                          "sts": torch.nn.Linear(11, 1)})

    def loss(self, task, x):
        return self.heads[task](self.encoder(x)).sin().sum()


def packed(seed=0):
    torch.manual_seed(seed)
    model = TinyMultitask()
    flat = FlatParameters(model.encoder.parameters(), {t: model.heads[t].parameters() for t in TASKS})
    return model, flat


def test_layout_views_and_values():
    torch.manual_seed(0)
    model = TinyMultitask()
    values = [p.detach().clone() for p in model.parameters()]
    flat = FlatParameters(model.encoder.parameters(), {t: model.heads[t].parameters() for t in TASKS})
    assert flat.is_intact() and flat.num_tasks == 3 and flat.task_names == list(TASKS)
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))
    shared = sum(-(-p.numel() // ALIGNMENT) * ALIGNMENT for p in model.encoder.parameters())
    assert flat.boundaries[:2] == [0, shared] and flat.boundaries[-1] == flat.numel and len(flat.boundaries) == 5
    for p in model.parameters():
        begin, end = flat.span(p)
        assert begin % ALIGNMENT == 0 and p.data_ptr() == flat.params[begin:].data_ptr()
    with torch.no_grad():
        flat.params.add_(1)  # writes through to the parameters
    assert torch.equal(model.encoder[0].bias, values[1] + 1)


def test_task_rows_receive_each_task_gradient():
    model, flat = packed()
    x = torch.randn(4, 7)
    expected = {t: torch.autograd.grad(model.loss(t, x), list(model.parameters()), allow_unused=True) for t in TASKS}
    for t in TASKS:
        with flat.task(t):
            model.loss(t, x).backward()
    for k, t in enumerate(TASKS):
        for p, g in zip(model.parameters(), expected[t]):
            begin, end = flat.span(p)
            row = flat.grads[k, begin:end].view_as(p)
            torch.testing.assert_close(row, torch.zeros_like(p) if g is None else g)
    flat.combine("sum")
    for p in model.parameters():
        total = sum(g for t in TASKS for q, g in zip(model.parameters(), expected[t]) if q is p and g is not None)
        torch.testing.assert_close(p.grad, total)


@pytest.mark.parametrize("method", ["pcgrad", "main-aux"])
def test_multitask_step_matches_plain_autograd_and_reference(method):
    model, flat = packed()
    reference = TinyMultitask()
    reference.load_state_dict(model.state_dict())
    opt = FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 7)
    orders = [[1, 2], [2, 0], [0, 1]]
    for t in TASKS:
        with flat.task(t):
            model.loss(t, x).backward()
    flat.combine(method, orders=orders, main="sts", generator=gen)
    # Reference: plain autograd gradients, flattened in the same layout, combined per pair in float64.
    rows = torch.zeros(3, flat.numel, dtype=torch.float64)
    for k, t in enumerate(TASKS):
        grads = torch.autograd.grad(reference.loss(t, x), list(reference.parameters()), allow_unused=True)
        for p, g in zip(model.parameters(), grads):
            if g is not None:
                begin, end = flat.span(p)
                rows[k, begin:end] = g.double().reshape(-1)
    expected = combine_reference(rows, method, boundaries=flat.boundaries, orders=orders, main=2)
    torch.testing.assert_close(flat.grad.double(), expected, rtol=1e-5, atol=1e-6)
    opt.step()
    assert flat.is_intact() and all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_round_trip_keeps_views():
    model, flat = packed(seed=0)
    other = TinyMultitask()
    buffer = io.BytesIO()
    torch.save(other.state_dict(), buffer)
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer))
    assert flat.is_intact()
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
        begin, end = flat.span(p)
        assert torch.equal(flat.params[begin:end].view_as(p), q)


def test_zero_grad_reattaches_views_after_set_to_none():
    model, flat = packed()
    with flat.task("sst"):
        model.loss("sst", torch.randn(2, 7)).backward()
    model.zero_grad()  # sets .grad to None
    flat.zero_grad()
    assert (flat.grads == 0).all()
    with flat.task("para"):
        model.loss("para", torch.randn(2, 7)).backward()
    assert flat.grads[1].abs().sum() > 0 and (flat.grads[0] == 0).all()


def test_grad_scaler_unscales_in_place_and_skips_overflow():
    results = []
    for use_scaler in (False, True):
        model, flat = packed()
        opt = FusedAdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=use_scaler)
        x = torch.randn(4, 7)
        for _ in range(3):
            for t in TASKS:
                with flat.task(t):
                    scaler.scale(model.loss(t, x)).backward()
            flat.combine("pcgrad", orders=[[1, 2], [2, 0], [0, 1]])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert flat.is_intact()
        results.append(flat.params.clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)

    model, flat = packed()
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = flat.params.clone()
    with flat.task("sst"):
        scaler.scale(model.loss("sst", torch.full((2, 7), float("inf")))).backward()
    flat.combine("pcgrad")
    scaler.step(opt)
    scaler.update()
    assert torch.equal(flat.params, before) and scaler.get_scale() < 2.0 ** 10


def test_misuse_gives_clear_errors():
    model, flat = packed()
    with pytest.raises(ValueError, match="already packed"):
        FlatParameters(model.encoder.parameters())
    with pytest.raises(ValueError, match=r"shared\[1\].*appears twice"):
        p = torch.nn.Parameter(torch.randn(3))
        FlatParameters([p, p])
    with pytest.raises(ValueError, match="must be float32"):
        FlatParameters([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="requires_grad"):
        FlatParameters([torch.randn(3)])
    with pytest.raises(TypeError, match="tasks must be a mapping"):
        FlatParameters([torch.nn.Parameter(torch.randn(3))], [[torch.nn.Parameter(torch.randn(3))]])
    with pytest.raises(KeyError, match="task must be one of"):
        flat.select_task("mnli")
    opt = FusedAdamW(model.parameters())
    with flat.task("sst"):
        with pytest.raises(RuntimeError, match="leave the flat.task"):
            flat.combine("pcgrad")
        with pytest.raises(RuntimeError, match="combine the task gradients"):
            opt.step()
    with pytest.raises(ValueError, match="mix parameters"):
        FusedAdamW(list(model.parameters()) + [torch.nn.Parameter(torch.randn(2))])
    model.encoder[0].weight.data = model.encoder[0].weight.data.clone()  # what .to()/.half() would do
    with pytest.raises(RuntimeError, match="no longer views"):
        opt.step()


def test_gradients_present_when_packing_are_kept():
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    expected = p.grad.clone()
    flat = FlatParameters([p])
    assert torch.equal(p.grad, expected) and p.grad.data_ptr() == flat.grad.data_ptr()


def test_own_rows_sends_each_head_to_its_row_and_refuses_mixed_shared_gradients():
    """Inside own_rows() one backward of several tasks' losses fills each head's own row; the
    shared parameters must get theirs from ops writing into shared_row_views(), so a plain autograd
    gradient on them (all tasks mixed) is an error."""
    model, flat = packed()
    x = torch.randn(4, 7)
    views = flat.shared_row_views()
    shared = list(model.encoder.parameters())
    assert set(views) == {id(p) for p in shared}
    for p in shared:
        for k, view in enumerate(views[id(p)]):
            assert view.shape == p.shape and view.data_ptr() == flat.grads[k].data_ptr() + 4 * flat.span(p)[0]
    features = model.encoder(x).detach()
    with flat.own_rows():
        assert all(p.grad is None for p in shared) and flat.selected_task == "own"
        sum(model.heads[t](features).sin().sum() * (i + 1) for i, t in enumerate(TASKS)).backward()
    assert flat.selected_task is None
    for k, task in enumerate(TASKS):
        for other in TASKS:
            begin, end = flat.span(next(model.heads[other].parameters()))
            assert bool(flat.grads[k, begin:end].any()) == (task == other)
    assert not flat.grads[:, :flat.boundaries[1]].any()
    with pytest.raises(RuntimeError, match="received a gradient of all tasks at once"):
        with flat.own_rows():
            model.loss("sst", x).backward()
    assert flat.selected_task is None


def test_numel_multiple_pads_the_last_segment():
    shared, head = torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(5))
    flat = FlatParameters([shared], {"a": [head]}, numel_multiple=3 * 16)
    assert flat.numel == 96 and flat.boundaries == [0, 48, 96] and flat.grads.shape == (1, 96)
    assert torch.equal(flat.params[48:53], head.detach().reshape(-1)) and not flat.params[53:].any()
    with pytest.raises(ValueError, match="numel_multiple must be an integer >= 1"):
        FlatParameters([torch.nn.Parameter(torch.randn(3))], numel_multiple=0)
