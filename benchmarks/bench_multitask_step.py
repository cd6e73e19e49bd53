"""One step of the paper's multitask training, the usual stack against mtbert, on the same
weights (all-MiniLM-L6-v2) and the same batches.

A step: a batch of 32 from each of SST, Quora and STS (pairs encoded as two sentences, SBERT
heads), three forward/backward passes, PCGrad over the task gradients, an AdamW update.

1. the usual stack: ``transformers.BertModel`` (its default SDPA attention) on padded batches;
   per-task ``backward`` whose gradients are cloned and flattened with ``torch.cat``; the per-pair
   Python PCGrad of the public Pytorch-PCGrad (clone + ``torch.dot``); ``torch.optim.AdamW``.
2. mtbert: ``mtbert.BertModel`` (unpadded; Triton kernels on a GPU); backward straight into the
   task's row of the flat gradient buffer; the two-pass C++ PCGrad; ``FusedAdamW``.

Both run PCGrad over the whole parameter vector with the same projection order and the torch
AdamW formula, so with dropout off they must produce the same update; that is checked before
anything is timed. Each row also records where its time goes (forward, backward, gradient
combination, optimizer) and, in a separate process, the peak memory of a training process.

    pytest benchmarks/bench_multitask_step.py -o python_files='bench_*.py'
    python benchmarks/bench_multitask_step.py --peak-memory usual|mtbert   # one process's peak
"""
import argparse
import contextlib
import copy
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import transformers

from mtbert import BertModel, Tokenizer
from mtbert.multitask.data import collate, load_task_file, write_synthetic_data
from mtbert.multitask.model import MultitaskBert
from mtbert.optim import FlatParameters, FusedAdamW, combine_reference, pcgrad_orders

TASKS = ("sst", "para", "sts")
TRAIN_FILES = {"sst": "ids-sst-train.csv", "para": "quora-train.csv", "sts": "sts-train.csv"}
BATCH_SIZE = 32
LR, WEIGHT_DECAY, EPS = 1e-5, 0.01, 1e-8
MODEL = "all-MiniLM-L6-v2"
DATA_DIR = Path(os.environ.get("MTBERT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def draw_batches(tokenizer, seed=0):
    """One batch of 32 per task, drawn at random from the real training files (synthetic files of
    the same format when ../shared/data is absent), so lengths follow the real distribution."""
    data_dir = DATA_DIR
    if not data_dir.is_dir():
        data_dir = write_synthetic_data(Path(tempfile.mkdtemp()) / "data")
    rng = random.Random(seed)
    batches = {}
    for task in TASKS:
        examples = load_task_file(task, data_dir / TRAIN_FILES[task]).examples
        batch = collate(rng.sample(examples, BATCH_SIZE), tokenizer, "separate")
        batches[task] = {"inputs": {k: v.to(DEVICE) for k, v in batch["inputs"].items()},
                         "labels": batch["labels"].to(DEVICE)}
    return batches


def build_model(stack):
    """MultitaskBert with dropout off; its encoder is transformers' for the usual stack."""
    if stack == "usual":
        encoder = transformers.BertModel.from_pretrained(
            BertModel.from_pretrained(MODEL).model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        encoder = BertModel.from_pretrained(MODEL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)  # the same fresh heads on both sides
    return MultitaskBert(encoder, para_head="sbert", sts_head="sbert", sts_loss="mse", dropout=0.0).to(DEVICE).train()


class PhaseTimer:
    """Wall time per phase of a step (synchronising a GPU at each boundary)."""

    def __init__(self):
        self.times = defaultdict(list)
        self.current = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        self.current[phase] += time.perf_counter() - start

    def end_step(self):
        for phase, seconds in self.current.items():
            self.times[phase].append(seconds)
        self.current.clear()

    def medians_ms(self):
        return {phase: round(statistics.median(t) * 1e3, 2) for phase, t in self.times.items()}


class UsualStep:
    """The usual stack's step: clone + flatten per task, per-pair Python PCGrad, torch AdamW."""

    def __init__(self, model, orders):
        self.model, self.orders = model, orders
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)

    def __call__(self, batches, timer):
        task_grads = []
        for task in TASKS:
            self.optimizer.zero_grad(set_to_none=False)
            with timer("forward"):
                loss = self.model.loss(task, self.model(task, batches[task]["inputs"]), batches[task]["labels"])
            with timer("backward"):
                loss.backward()
            with timer("combine"):
                task_grads.append(torch.cat([p.grad.flatten() for p in self.params]))
        with timer("combine"):
            combined = combine_reference(torch.stack(task_grads), "pcgrad", orders=self.orders, dtype=torch.float32)
            offset = 0
            for p in self.params:
                p.grad.copy_(combined[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        with timer("optimizer"):
            self.optimizer.step()


class MtbertStep:
    """mtbert's step: backward into flat gradient rows, C++ PCGrad, FusedAdamW."""

    def __init__(self, model, orders):
        self.model, self.orders = model, orders
        self.flat = FlatParameters(shared=model.encoder.parameters(),
                                   tasks={task: model.heads[task].parameters() for task in TASKS})
        self.optimizer = FusedAdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY, formula="torch")

    def __call__(self, batches, timer):
        self.optimizer.zero_grad()
        for task in TASKS:
            with self.flat.task(task):
                with timer("forward"):
                    loss = self.model.loss(task, self.model(task, batches[task]["inputs"]), batches[task]["labels"])
                with timer("backward"):
                    loss.backward()
        with timer("combine"):
            self.flat.combine("pcgrad", scope="all", orders=self.orders)
        with timer("optimizer"):
            self.optimizer.step()


STEPS = {"usual": UsualStep, "mtbert": MtbertStep}


def parameter_vector(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def setup():
    tokenizer = Tokenizer.from_pretrained(MODEL)
    batches = draw_batches(tokenizer)
    orders = pcgrad_orders(len(TASKS), torch.Generator().manual_seed(0))
    return batches, orders


def test_both_stacks_make_the_same_update(setup):
    """One step from the same weights: the combined gradients and the updated parameters agree."""
    batches, orders = setup
    before, after = {}, {}
    for stack, step_cls in STEPS.items():
        model = build_model(stack)
        step = step_cls(model, orders)
        before[stack] = parameter_vector(model)
        step(batches, PhaseTimer())
        after[stack] = parameter_vector(model)
    torch.testing.assert_close(before["mtbert"], before["usual"], rtol=0, atol=0)
    delta_mtbert, delta_usual = after["mtbert"] - before["mtbert"], after["usual"] - before["usual"]
    error = (delta_mtbert - delta_usual).norm() / delta_usual.norm()
    # Adam's first step is ~lr·sign(g): elements whose gradient is rounding noise may flip sign,
    # so the update is compared as a whole (relative norm) as well as element-wise.
    assert error < 1e-2, f"updates differ: relative error {error:.2e}"
    torch.testing.assert_close(after["mtbert"], after["usual"], rtol=0, atol=2.5 * LR)


@pytest.mark.parametrize("stack", list(STEPS))
def test_multitask_step(benchmark, setup, stack):
    batches, orders = setup
    step = STEPS[stack](build_model(stack), orders)
    timer = PhaseTimer()
    step(batches, timer)  # warm-up: allocations, Triton compilation
    timer = PhaseTimer()

    def one_step():
        step(batches, timer)
        timer.end_step()

    rounds = 3 if DEVICE.type == "cpu" else 20
    benchmark.group = f"multitask step (3 tasks x {BATCH_SIZE}, PCGrad, AdamW) on {DEVICE.type}"
    benchmark.extra_info.update(impl="usual stack (transformers + Python PCGrad + torch AdamW)" if stack == "usual"
                                else "mtbert", baseline=stack == "usual", items=len(TASKS) * BATCH_SIZE,
                                item_name="examples")
    benchmark.pedantic(one_step, rounds=rounds, iterations=1)
    benchmark.extra_info["phases_ms"] = timer.medians_ms()
    benchmark.extra_info["peak_memory_mb"] = peak_memory_mb(stack)


def peak_memory_mb(stack):
    """Peak memory of a training process doing this step: on a GPU the allocator's peak in
    this process; on the CPU the peak resident size of a fresh process (model loading included)."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step = STEPS[stack](build_model(stack), pcgrad_orders(len(TASKS)))
        step(draw_batches(Tokenizer.from_pretrained(MODEL)), PhaseTimer())
        return torch.cuda.max_memory_allocated() / 2**20
    out = subprocess.run([sys.executable, __file__, "--peak-memory", stack], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description="Peak memory of one process running training steps.")
    parser.add_argument("--peak-memory", choices=list(STEPS), required=True)
    args = parser.parse_args()
    step = STEPS[args.peak_memory](build_model(args.peak_memory), pcgrad_orders(len(TASKS)))
    batches = draw_batches(Tokenizer.from_pretrained(MODEL))
    step(batches, PhaseTimer())  # the optimizer state is allocated here: one step reaches the peak
    # VmHWM, not getrusage's ru_maxrss: the latter survives fork+exec, so it would report the
    # high-water mark of the pytest process that started this one.
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)


if __name__ == "__main__":
    main()
