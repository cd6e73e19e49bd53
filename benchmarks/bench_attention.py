"""Attention forward + backward: mtbert.kernels.varlen_attention (Triton FlashAttention-2 on a
GPU, the PyTorch varlen path on the CPU) against torch's scaled_dot_product_attention and the
naive matmul-softmax-matmul attention of minBERT.

GPU (bfloat16): B = 32/64, L = 64/128/512 (every sequence full, so SDPA's flash backend applies),
head dims 32 and 64 with 12 heads, against SDPA's flash and memory-efficient backends and the
naive attention; plus SST-like variable lengths (B = 32, L <= 64) against SDPA with a key mask.
CPU (float32): the SST-like batch only, with the two other ways to run packed sequences in
PyTorch that mtbert's CPU path was chosen against: one SDPA call per length bucket, and SDPA on
nested (jagged) tensors. Throughput counts the FLOPs of the real tokens only:
forward 4·h·d·Σ len², backward 2.5 times that. Every implementation's output and gradients are
checked against the float32 naive attention before timing.

    pytest benchmarks/bench_attention.py -o python_files='bench_*.py' [--benchmark-json=out.json]
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, FULL, synchronize
from torch.nn.attention import SDPBackend, sdpa_kernel

from mtbert import kernels

GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
HEADS = 12
FULL_SHAPES = [(B, L, d) for B in (32, 64) for L in (64, 128, 512) for d in (32, 64)] if GPU else []
SST_SHAPES = [(32, d) for d in ((32, 64) if GPU or FULL else (32,))]


def sst_like_lengths(batch, seed=0):
    """Lengths with the shape of SST's token counts (median ~20, tail to ~60)."""
    rng = random.Random(seed)
    return [min(64, max(3, round(rng.lognormvariate(3.0, 0.45)))) for _ in range(batch)]


def naive(q, k, v, key_ok, scale):
    """minBERT's attention on [B, heads, L, d] with an additive key mask."""
    bias = torch.zeros(key_ok.shape, dtype=q.dtype, device=q.device).masked_fill(~key_ok, torch.finfo(q.dtype).min)
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale + bias[:, None, None, :], dim=-1)
    return probs @ v


def sdpa_per_length_bucket(q, k, v, cu_seqlens, scale):
    """Packed attention as one SDPA call per distinct sequence length (the sequences of a bucket
    gathered into one [n, heads, len, d] batch)."""
    heads, head_dim = q.shape[1:]
    offsets = cu_seqlens.tolist()
    starts = torch.tensor(offsets[:-1], device=q.device)
    lengths = cu_seqlens.diff()
    bucket_tokens, contexts = [], []
    for length in lengths.unique().tolist():
        tokens = (starts[lengths == length][:, None] + torch.arange(length, device=q.device)).reshape(-1)
        q_b, k_b, v_b = (t[tokens].view(-1, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        contexts.append(F.scaled_dot_product_attention(q_b, k_b, v_b, scale=scale).transpose(1, 2).reshape(
            -1, heads, head_dim))
        bucket_tokens.append(tokens)
    return torch.empty_like(q).index_copy(0, torch.cat(bucket_tokens), torch.cat(contexts))


def sdpa_nested(q, k, v, cu_seqlens, scale):
    """Packed attention as SDPA on jagged nested tensors [B, heads, j, d]."""
    offsets = cu_seqlens.long()
    q_n, k_n, v_n = (torch.nested.nested_tensor_from_jagged(t, offsets=offsets).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q_n, k_n, v_n, scale=scale).transpose(1, 2).values()


def make_case(lengths, L, head_dim):
    B = len(lengths)
    lengths_t = torch.tensor(lengths, device=DEVICE)
    key_ok = torch.arange(L, device=DEVICE) < lengths_t[:, None]  # (B, L)
    tokens = key_ok.reshape(-1).nonzero().squeeze(1)
    padded = [torch.randn(B, L, HEADS, head_dim, device=DEVICE, dtype=DTYPE) for _ in range(3)]
    packed = [t.reshape(B * L, HEADS, head_dim)[tokens].contiguous() for t in padded]
    cu_seqlens = torch.nn.functional.pad(lengths_t.cumsum(0, dtype=torch.int32), (1, 0))
    grad = torch.randn(B, L, HEADS, head_dim, device=DEVICE, dtype=DTYPE) * key_ok[:, :, None, None]
    return dict(padded=padded, packed=packed, cu_seqlens=cu_seqlens, key_ok=key_ok, tokens=tokens, grad=grad,
                max_len=max(lengths), full=all(n == L for n in lengths), scale=1 / math.sqrt(head_dim))


def implementations(case):
    """name -> fn(q, k, v) returning output and the tensors whose .grad to check, on its layout."""
    scale, key_ok, full = case["scale"], case["key_ok"], case["full"]

    def heads_first(fn):
        def run(q, k, v):
            return fn(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return run

    impls = {
        "naive matmul-softmax-matmul (minBERT)": heads_first(lambda q, k, v: naive(q, k, v, key_ok, scale)),
        "mtbert varlen_attention": lambda q, k, v: kernels.varlen_attention(
            q, k, v, case["cu_seqlens"], case["max_len"], softmax_scale=scale),
    }
    if GPU and full:
        for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.EFFICIENT_ATTENTION, "efficient")):
            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
            impls[f"torch SDPA {name}"] = heads_first(sdpa)
    else:
        impls["torch SDPA (key mask)"] = heads_first(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_ok[:, None, None, :], scale=scale))
    if not GPU:
        impls["packed: SDPA per length bucket"] = lambda q, k, v: sdpa_per_length_bucket(q, k, v, case["cu_seqlens"], scale)
        impls["packed: nested-tensor SDPA"] = lambda q, k, v: sdpa_nested(q, k, v, case["cu_seqlens"], scale)
    return impls


def run_case(benchmark, group, case, impl):
    fn = implementations(case)[impl]
    packed = impl.startswith(("mtbert", "packed"))
    inputs = [t.detach().clone().requires_grad_() for t in case["packed" if packed else "padded"]]
    grad = case["grad"].reshape(-1, *case["grad"].shape[2:])[case["tokens"]] if packed else case["grad"]

    # Numerics: output and gradients at the real tokens against the float32 naive attention. The
    # allowed error is FlashAttention's criterion: at most twice that of the naive attention run
    # in the benchmark's dtype (bfloat16 on a GPU), with a small floor.
    def run(impl_fn, tensors, grad_out):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out = impl_fn(*tensors)
        out.backward(grad_out)
        return [out] + [t.grad for t in tensors]

    def real(t, is_packed):
        return (t if is_packed else t.reshape(-1, *t.shape[2:])[case["tokens"]]).float()

    naive_fn = implementations(case)["naive matmul-softmax-matmul (minBERT)"]
    exact = run(naive_fn, [t.float() for t in case["padded"]], case["grad"].float())
    low_precision = run(naive_fn, case["padded"], case["grad"])
    ours = run(fn, case["packed" if packed else "padded"], grad)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, exact, low_precision):
        error = (real(a, packed) - real(b, False)).abs().max().item()
        allowed = 2 * (real(c, False) - real(b, False)).abs().max().item() + 1e-4
        assert error <= allowed, f"{impl} {name}: max error {error:.3g} > {allowed:.3g}"
    inputs = [t.detach().clone().requires_grad_() for t in case["packed" if packed else "padded"]]

    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
        synchronize()

    lengths = case["cu_seqlens"].diff().tolist()
    head_dim = case["padded"][0].shape[-1]
    flops = 3.5 * 4 * HEADS * head_dim * sum(n * n for n in lengths)
    benchmark.group = group
    unit, scale = ("TFLOP", 1e12) if GPU else ("GFLOP", 1e9)
    benchmark.extra_info.update(impl=impl, baseline=impl.startswith("torch SDPA"), items=flops / scale,
                                item_name=unit)
    benchmark.pedantic(step, rounds=20 if GPU else 5, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("shape", FULL_SHAPES, ids=lambda s: "B{}-L{}-d{}".format(*s))
@pytest.mark.parametrize("impl", ["torch SDPA flash", "torch SDPA efficient", "naive matmul-softmax-matmul (minBERT)",
                                  "mtbert varlen_attention"])
def test_attention_full_lengths(benchmark, shape, impl):
    B, L, head_dim = shape
    torch.manual_seed(0)
    run_case(benchmark, f"attention fwd+bwd B={B} L={L} d={head_dim} bf16", make_case([L] * B, L, head_dim), impl)


@pytest.mark.parametrize("shape", SST_SHAPES, ids=lambda s: "B{}-d{}".format(*s))
@pytest.mark.parametrize("impl", ["torch SDPA (key mask)", "naive matmul-softmax-matmul (minBERT)", "mtbert varlen_attention"]
                         + ([] if GPU else ["packed: SDPA per length bucket", "packed: nested-tensor SDPA"]))
def test_attention_sst_lengths(benchmark, shape, impl):
    B, head_dim = shape
    torch.manual_seed(0)
    lengths = sst_like_lengths(B)
    group = f"attention fwd+bwd B={B} SST-like lengths (max {max(lengths)}) d={head_dim} {str(DTYPE)[6:]}"
    run_case(benchmark, group, make_case(lengths, max(lengths), head_dim), impl)
