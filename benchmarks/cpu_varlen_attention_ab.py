"""The CPU packed attention op (csrc/varlen_attention.cpp) against the path before it, interleaved in
one process: the encoder training step on bucketed SST batches with unpadding forced, and the
packed multitask step (``stacks.MtbertPackedStep`` as ``bench_multitask_step.py`` builds it).

Both sides are the same model code with the fused CPU kernels on; only ``kernels.varlen_attention_qkv``'s
float32 CPU branch differs: the C++ op, or ``varlen_attention_torch`` on qkv's q, k, v views (padded
per run of similar lengths, matmul, fused softmax + dropout, matmul, gathered back), the path before. The order alternates
every pass (A B, then B A) against load drift; each side's median over passes of the process CPU
time (and wall time) of one pass over all batches is printed, with the ratio.

    OMP_NUM_THREADS=2 python benchmarks/cpu_varlen_attention_ab.py --threads 2 --repeats 7
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import draw_sst_batches, make_mtbert, training_step  # noqa: E402
from bench_multitask_step import build_model, draw_step_batches  # noqa: E402
from conftest import MINILM  # noqa: E402
from stacks import TASKS, MtbertPackedStep, PhaseTimer  # noqa: E402

from mtbert import Tokenizer  # noqa: E402
from mtbert.kernels.attention import varlen_attention_torch  # noqa: E402
from mtbert.kernels import varlen_attention_cpu as op_module  # noqa: E402
from mtbert.optim import pcgrad_orders  # noqa: E402

PACKED_OP = op_module.varlen_attention_qkv_cpu


def padded_path(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None):
    """The float32 CPU path before the op."""
    return varlen_attention_torch(*qkv.unbind(1), cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                  fused_softmax_dropout=True)


SIDES = {"before (padded per run)": padded_path, "after (packed C++ op)": PACKED_OP}


def interleave(run_pass, repeats):
    """{side: (median CPU s, median wall s)} over ``repeats`` passes, after one warm-up pass each."""
    cpu, wall = {side: [] for side in SIDES}, {side: [] for side in SIDES}
    for repeat in range(repeats + 1):
        order = list(SIDES) if repeat % 2 == 0 else list(reversed(SIDES))
        for side in order:
            op_module.varlen_attention_qkv_cpu = SIDES[side]  # what kernels.varlen_attention_qkv calls
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            run_pass(side)
            if repeat:
                cpu[side].append(time.process_time() - start_cpu)
                wall[side].append(time.perf_counter() - start_wall)
    op_module.varlen_attention_qkv_cpu = PACKED_OP
    return {side: (statistics.median(cpu[side]), statistics.median(wall[side])) for side in SIDES}


def report(title, medians):
    print(title)
    before, after = (medians[side] for side in SIDES)
    for side, (c, w) in medians.items():
        print(f"  {side:26s} cpu {c * 1e3:8.1f} ms  wall {w * 1e3:8.1f} ms")
    print(f"  after / before speedup: cpu {before[0] / after[0]:.3f}x  wall {before[1] / after[1]:.3f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=3, help="encoder step: bucketed SST batches per pass")
    parser.add_argument("--steps", type=int, default=2, help="multitask step: packed steps per pass")
    parser.add_argument("--only", choices=("encoder", "multitask"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), {args.repeats} interleaved passes, load average {os.getloadavg()[0]:.1f}")
    if args.only != "multitask":
        batches = draw_sst_batches("bucketed", args.batches)
        # impl "mtbert": unpad=True (bucketed batches have little padding: "auto" would run them padded)
        models = {side: make_mtbert(MINILM, "mtbert", "fp32").train() for side in SIDES}

        def encoder_pass(side):
            for batch in batches:
                training_step(models[side], batch, "fp32")

        report(f"encoder step, {args.batches} bucketed batches of 32 SST sentences, unpadded, per pass",
               interleave(encoder_pass, args.repeats))
    if args.only != "encoder":
        step_batches = draw_step_batches("bucketed", args.steps, Tokenizer.from_pretrained(MINILM))
        orders = pcgrad_orders(len(TASKS), torch.Generator().manual_seed(0))
        steps = {side: MtbertPackedStep(build_model("mtbert packed"), orders) for side in SIDES}

        def multitask_pass(side):
            for batches in step_batches:
                steps[side](batches, PhaseTimer())

        report(f"multitask step (one packed pass, 3 tasks x 32, PCGrad, AdamW), {args.steps} bucketed steps per pass",
               interleave(multitask_pass, args.repeats))


if __name__ == "__main__":
    main()
