"""FusedAdamW against torch.optim.AdamW (foreach=False, the CPU default; foreach=True; fused=True)
on the parameter tensors of MiniLM-L6 (22M) and, with BENCH_FULL=1, BERT-base (110M).

One AdamW step reads param, grad, exp_avg, exp_avg_sq and writes three of them: 28 bytes per
parameter at the least; the report puts the effective GB/s next to the triad probe of the run.
Every implementation's first step is checked against torch.optim.AdamW's before timing.

    pytest benchmarks/bench_adamw.py -o python_files='bench_*.py' [--benchmark-json=out.json]
"""
import pytest
import torch
from conftest import DEVICE, MODELS, synchronize

from mtbert.optim import FusedAdamW, adamw_reference

IMPLEMENTATIONS = ["torch foreach=False", "torch foreach=True", "torch fused=True", "mtbert FusedAdamW torch",
                   "mtbert FusedAdamW handout"]
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
BYTES_PER_PARAMETER = 28


def make_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
    return params


def make_optimizer(impl, params):
    if impl.startswith("torch"):
        option = impl.split()[1].split("=")[0]
        return torch.optim.AdamW(params, **HYPER, **{option: True if option != "foreach" else impl.endswith("True")})
    return FusedAdamW(params, **HYPER, formula=impl.split()[-1])


@pytest.mark.parametrize("model", list(MODELS))
def test_bandwidth_probe(benchmark, triad_probe, model):
    triad_probe(benchmark, sum(torch.Size(s).numel() for s in MODELS[model]), f"adamw P={model}")


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_adamw_step(benchmark, model, impl):
    shapes = MODELS[model]
    numel = sum(torch.Size(s).numel() for s in shapes)
    params = make_params(shapes)
    optimizer = make_optimizer(impl, params)
    # Numerics first: one step from the same start against torch.optim.AdamW's default path, or
    # against the float64 formula for the handout's AdamW.
    reference = make_params(shapes)
    if impl.endswith("handout"):
        for r in reference:
            r.data = r.data.double()
            adamw_reference(r.data, r.grad.double(), torch.zeros_like(r.data), torch.zeros_like(r.data), 1, **HYPER)
    else:
        torch.optim.AdamW(reference, **HYPER).step()
    optimizer.step()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.double(), r.double(), rtol=1e-6, atol=1e-7)
    del reference

    def step():
        optimizer.step()
        synchronize()

    benchmark.group = f"adamw P={model}"
    benchmark.extra_info.update(impl=impl, bytes=BYTES_PER_PARAMETER * numel, parameters=numel,
                                tensors=len(shapes), baseline=impl == "torch foreach=False")
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
