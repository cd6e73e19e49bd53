"""The encoder's training step (forward + backward) in tokens/s: mtbert.BertModel on its unpadded
path, mtbert.BertModel on its padded reference path, and transformers.BertModel (its default SDPA
attention), all with the same all-MiniLM-L6-v2 weights, on batches of 32 SST sentences drawn at
random from ../shared/data (the real length distribution; skipped when the data is absent).

On a GPU the step runs under bfloat16 autocast and mtbert uses its Triton kernels; on the CPU it
runs in float32 and mtbert's attention is PyTorch (see mtbert/kernels/__init__.py). Before timing,
each implementation's output at the real tokens (eval mode) is checked against transformers.

    pytest benchmarks/bench_encoder.py -o python_files='bench_*.py' [--benchmark-json=out.json]
    python benchmarks/bench_encoder.py [--threads 1] [--batches 4] [--repeats 3]

The second form interleaves the implementations batch by batch (robust to a machine whose load
drifts, as a shared one does) and prints median wall and process CPU seconds per step and ratios.
"""
import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import DEVICE, synchronize

from mtbert import BertModel, Tokenizer
from mtbert.multitask.data import load_task_file
from mtbert.pretrained import resolve_model_dir

DATA_DIR = Path(os.environ.get("MTBERT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
BATCH_SIZE = 32
BATCHES_PER_CALL = 3 if DEVICE.type == "cpu" else 8
IMPLEMENTATIONS = ["transformers BertModel (sdpa)", "mtbert padded", "mtbert unpadded"]
AUTOCAST_DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else None


def draw_sst_batches(count, seed=0):
    """``count`` batches of BATCH_SIZE SST train sentences drawn at random, tokenized, on DEVICE."""
    path = DATA_DIR / "ids-sst-train.csv"
    sentences = [example.texts[0] for example in load_task_file("sst", path).examples]
    tokenizer = Tokenizer.from_pretrained("all-MiniLM-L6-v2")
    rng = random.Random(seed)
    batches = [tokenizer(rng.sample(sentences, BATCH_SIZE)) for _ in range(count)]
    return [{key: value.to(DEVICE) for key, value in batch.items()} for batch in batches]


@pytest.fixture(scope="module")
def sst_batches():
    if not (DATA_DIR / "ids-sst-train.csv").is_file():
        pytest.skip(f"SST data not found in {DATA_DIR} (set MTBERT_DATA)")
    return draw_sst_batches(BATCHES_PER_CALL)


def make_model(impl):
    if impl.startswith("transformers"):
        model = transformers.BertModel.from_pretrained(str(resolve_model_dir("all-MiniLM-L6-v2")),
                                                       attn_implementation="sdpa")
    else:
        model = BertModel.from_pretrained("all-MiniLM-L6-v2")
        model.unpad = impl.endswith("unpadded")
    return model.to(DEVICE)


def training_step(model, batch):
    model.zero_grad(set_to_none=True)
    out = forward(model, batch)
    # Every output position and the pooler receive a gradient, as in fine-tuning.
    (out.last_hidden_state.float().square().mean() + out.pooler_output.float().sum()).backward()


def forward(model, batch):
    with torch.autocast(DEVICE.type, dtype=AUTOCAST_DTYPE, enabled=AUTOCAST_DTYPE is not None):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"])


def test_padding_fraction(sst_batches):
    """Not timed: records how much of a padded batch is padding (printed with -s)."""
    real = sum(int(b["attention_mask"].sum()) for b in sst_batches)
    total = sum(b["attention_mask"].numel() for b in sst_batches)
    print(f"\nSST batches of {BATCH_SIZE}: {real} real tokens of {total}, padding fraction {1 - real / total:.3f}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encoder_training_step(benchmark, sst_batches, impl):
    model = make_model(impl).eval()
    reference = make_model(IMPLEMENTATIONS[0]).eval()
    # bfloat16 keeps ~3 significant digits per op; six layers of them drift by about a percent.
    tol = dict(atol=1e-4, rtol=0) if AUTOCAST_DTYPE is None else dict(atol=0.1, rtol=0.05)
    with torch.no_grad():
        for batch in sst_batches:
            keep = batch["attention_mask"].bool()
            torch.testing.assert_close(forward(model, batch).last_hidden_state[keep].float(),
                                       forward(reference, batch).last_hidden_state[keep].float(), **tol)
    del reference
    model.train()

    def steps():
        for batch in sst_batches:
            training_step(model, batch)
        synchronize()

    real_tokens = sum(int(b["attention_mask"].sum()) for b in sst_batches)
    padded_tokens = sum(b["attention_mask"].numel() for b in sst_batches)
    benchmark.group = f"encoder train step MiniLM-L6 {BATCHES_PER_CALL}x{BATCH_SIZE} SST" + (
        " bf16" if AUTOCAST_DTYPE else " fp32")
    benchmark.extra_info.update(impl=impl, baseline=impl == IMPLEMENTATIONS[0], items=real_tokens,
                                item_name="tokens", padding_fraction=1 - real_tokens / padded_tokens)
    benchmark.pedantic(steps, rounds=5 if DEVICE.type == "cpu" else 20, iterations=1, warmup_rounds=1)


def interleaved(threads, batches, repeats):
    torch.set_num_threads(threads)
    batches = draw_sst_batches(batches)
    models = {impl: make_model(impl).train() for impl in IMPLEMENTATIONS}
    wall = {impl: [] for impl in IMPLEMENTATIONS}
    cpu = {impl: [] for impl in IMPLEMENTATIONS}
    for repeat in range(repeats + 1):  # the first pass warms up and is not counted
        for batch in batches:
            for impl, model in models.items():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                training_step(model, batch)
                synchronize()
                if repeat:
                    wall[impl].append(time.perf_counter() - start_wall)
                    cpu[impl].append(time.process_time() - start_cpu)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    print(f"{len(batches)} batches of {BATCH_SIZE} SST sentences, padding fraction {1 - real / total:.3f}, "
          f"{threads} thread(s), {repeats} interleaved passes, load average {os.getloadavg()[0]:.1f}")
    baseline = IMPLEMENTATIONS[0]
    for impl in IMPLEMENTATIONS:
        w, c = statistics.median(wall[impl]), statistics.median(cpu[impl])
        print(f"{impl:32s} wall {w:.3f} s/step ({real / len(batches) / w:,.0f} tokens/s, "
              f"{statistics.median(wall[baseline]) / w:.2f}x)  cpu {c:.3f} s/step "
              f"({statistics.median(cpu[baseline]) / c:.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.exit(interleaved(args.threads, args.batches, args.repeats))
