"""Shared benchmark fixtures: machine facts for the report, the sizes to run, and the memory
bandwidth probe (a STREAM-triad-like kernel) that GB/s figures are put against in the same run.

Sizes: P = 22M parameters (all-MiniLM-L6-v2) always; 110M (BERT-base) with ``BENCH_FULL=1``.
"""
import os

import pytest
import torch

FULL = os.environ.get("BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bert_parameter_shapes(hidden: int, layers: int, vocab: int = 30522, positions: int = 512):
    """The trainable tensors of a BERT encoder (+ pooler), in model order: realistic counts and sizes."""
    h, f = hidden, 4 * hidden
    shapes = [(vocab, h), (positions, h), (2, h), (h,), (h,)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,)] + [(f, h), (f,), (h, f), (h,), (h,), (h,)]
    return shapes + [(h, h), (h,)]


# name -> parameter shapes; MiniLM-L6 (22.7M) always, BERT-base (109M) with BENCH_FULL=1.
MODELS = {"22M": bert_parameter_shapes(384, 6)}
if FULL:
    MODELS["110M"] = bert_parameter_shapes(768, 12)


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["mtbert"] = {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


@pytest.fixture
def triad_probe():
    """run(benchmark, numel): times a = b + s * c over float32 vectors of ``numel`` elements
    (12 bytes per element moved) as the bandwidth probe row of the report."""

    def run(benchmark, numel: int, group: str):
        a, b, c = (torch.rand(numel, device=DEVICE) for _ in range(3))

        def triad():
            torch.add(b, c, alpha=3.0, out=a)
            synchronize()

        triad()
        torch.testing.assert_close(a, b + 3.0 * c)
        benchmark.group = group
        benchmark.extra_info.update(impl="triad probe a = b + s c", bandwidth_probe=True, bytes=12 * numel)
        benchmark.pedantic(triad, rounds=15, iterations=1, warmup_rounds=2)

    return run
