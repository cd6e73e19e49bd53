"""The encoder's training step (forward + backward, dropout on) in real tokens/s, every row of a
table with the same weights -- all-MiniLM-L6-v2 (``MTBERT_MINILM``, see conftest), and on a GPU or
with BENCH_FULL=1 also a random-init BERT-base (``conftest.bert_base_dir``) -- on batches of 32
SST training sentences in two regimes (see ``conftest.trainer_batches``): random batches padded to
the longest (the CS224N starter's way) and the trainer's length-bucketed batches. Skipped when the
data is absent (a failure with ``MTBERT_NO_SKIP=1``).

Rows (one table; ratios by tokens/s, so rows on different batches compare):

- the usual way: ``transformers.BertModel`` (SDPA attention) on random batches -- the baseline;
  mtbert's padded reference path and mtbert on the same random batches;
- the competent stack: ``transformers.BertModel`` (SDPA) on the bucketed batches, eager and (on the
  CPU, or with BENCH_FULL=1) under ``torch.compile(dynamic=True)`` (compiled once before timing);
  mtbert on the same batches;
- bf16 (a CPU with AVX-512-BF16 or AMX, or a GPU): the competent rows under bf16 autocast, and
  mtbert's bf16 row (:func:`make_mtbert`).

Each row records the GEMM FLOPs it executes (:func:`executed_gemm_flops`, formula in
``GEMM_FLOPS_FORMULA``), put by the report against the matrix-multiply rate of the same run
(``test_matmul_rate``: a 2048³ product and the encoder's own GEMM shapes, per dtype). Before
timing, each eager row's output at the real tokens (eval mode) is checked against transformers'.

    pytest benchmarks/bench_encoder.py -o python_files='bench_*.py' [--benchmark-json=out.json]
    python benchmarks/bench_encoder.py [--threads 1] [--regime random] [--batches 4] [--repeats 3] [--precision bf16]

The second form interleaves the eager rows batch by batch (robust to a machine whose load drifts,
as a shared one does) and prints the median over passes of each pass's wall and process CPU
seconds (all batches; a median per step would pick one batch length) and ratios. It adds
the row "mtbert, PyTorch ops": mtbert with ``MTBERT_KERNELS=torch``, i.e. without the fused CPU
kernels (dropout + add + LayerNorm, softmax + dropout), so their gain is measured in the same run.
``--precision bf16`` runs every row under bf16 autocast.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Optional

import pytest
import torch
import transformers
from conftest import (AUTOCAST_DTYPES, DATA_DIR, DEVICE, ENCODERS, FULL, MINILM, PRECISIONS, REGIME_NAMES, REGIMES,
                      StepRow, padding_fraction, synchronize, trainer_batches)

from mtbert import BertModel, Tokenizer
from mtbert.pretrained import resolve_model_dir

BATCH_SIZE = 32
BATCHES_PER_CALL = 3 if DEVICE.type == "cpu" else 8
ROUNDS = 5  # a GPU run has about 150 s for every suite
# The compiled competent rows: on the CPU; on a GPU only with BENCH_FULL=1 (their cold compiles,
# about a minute each, would not fit the GPU run's time).
COMPILED_ROWS = DEVICE.type == "cpu" or FULL
# Tokens of a GEMM row of the matrix-multiply probe: about 32 sentences × 32 tokens.
PROBE_TOKENS = 1024
GEMM_FLOPS_FORMULA = (
    "GEMM FLOP per batch = 3 × [n_layers × (2·T·h·(4h + 2f) + 4·h·Σ_b L²) + 2·B·h²]: the four h×h "
    "projections and the two FFN products on T tokens, attention's QKᵀ and PV on each of the B "
    "sequences padded to the batch's length L (every implementation here runs attention padded), "
    "the pooler; 3× = forward + backward (two products per forward product). T = real tokens for "
    "mtbert's unpadded path, B·L otherwise; h, f and n_layers of the config (MiniLM-L6: 384, 1536, 6; "
    "BERT-base: 768, 3072, 12); embeddings not counted.")


IMPL_NAMES = {"transformers": "transformers BertModel (sdpa)", "mtbert": "mtbert",
              "mtbert padded": "mtbert padded path"}


def encoder_rows():
    first = PRECISIONS[0]
    rows = [StepRow("transformers", "random", first, baseline=True),
            StepRow("mtbert padded", "random", first), StepRow("mtbert", "random", first)]
    for precision in PRECISIONS:
        rows.append(StepRow("transformers", "bucketed", precision, competent=True))
        if COMPILED_ROWS:
            rows.append(StepRow("transformers", "bucketed", precision, compiled=True, competent=True))
        rows.append(StepRow("mtbert", "bucketed", precision))
    return rows


ROWS = encoder_rows()
# Issue #11's goals for mtbert's rows on a GPU (bf16): >= 1.5x transformers on random batches (the
# baseline), >= 1.1x the competent stack on bucketed batches; shown in the report's goals table.
GPU_GOALS = {("mtbert", "random"): {"baseline": 1.5}, ("mtbert", "bucketed"): {"competent": 1.1}}


def group_name(encoder):
    return f"encoder train step {encoder}, {BATCHES_PER_CALL} batches of {BATCH_SIZE} SST sentences"


def draw_sst_batches(regime, count, seed=0):
    """``count`` batches of BATCH_SIZE SST train sentences in ``regime``, tokenized, on DEVICE."""
    tokenizer = Tokenizer.from_pretrained(MINILM)
    batches = trainer_batches("sst", regime, count, tokenizer, batch_size=BATCH_SIZE, seed=seed)
    return [{key: value.to(DEVICE) for key, value in batch["inputs"].items()} for batch in batches]


@pytest.fixture(scope="module")
def sst_batches():
    if not (DATA_DIR / "ids-sst-train.csv").is_file():
        pytest.skip(f"SST data not found in {DATA_DIR} (set MTBERT_DATA)")
    return {regime: draw_sst_batches(regime, BATCHES_PER_CALL) for regime in REGIMES}


def make_transformers(model_dir):
    return transformers.BertModel.from_pretrained(str(model_dir), attn_implementation="sdpa").to(DEVICE)


def make_mtbert(model_dir, impl, precision):
    """mtbert's encoder for a row. bf16: the model as it is, run under autocast like the
    transformers rows (it works under CPU autocast). Section 2's CPU bf16 path (``--bf16``) plugs
    in here when it needs more than autocast."""
    model = BertModel.from_pretrained(model_dir)
    model.unpad = impl == "mtbert"
    return model.to(DEVICE)


def make_model(row, model_dir):
    model = make_transformers(model_dir) if row.impl == "transformers" else make_mtbert(model_dir, row.impl,
                                                                                          row.precision)
    if row.compiled:
        model.compile(dynamic=True)
    return model


def forward(model, batch, precision):
    dtype = AUTOCAST_DTYPES[precision]
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"])


def training_step(model, batch, precision):
    model.zero_grad(set_to_none=True)
    out = forward(model, batch, precision)
    # Every output position and the pooler receive a gradient, as in fine-tuning.
    (out.last_hidden_state.float().square().mean() + out.pooler_output.float().sum()).backward()


def executed_gemm_flops(batches, unpadded, config):
    """GEMM FLOPs of the training steps on ``batches`` (see GEMM_FLOPS_FORMULA) of an encoder with
    ``config`` (mtbert's or transformers' BertConfig)."""
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    total = 0
    for batch in batches:
        B, L = batch["attention_mask"].shape
        tokens = int(batch["attention_mask"].sum()) if unpadded else B * L
        per_layer = 2 * tokens * hidden * (4 * hidden + 2 * ffn) + 4 * hidden * B * L * L
        total += 3 * (layers * per_layer + 2 * B * hidden * hidden)
    return total


def check_outputs(model, model_dir, batches, precision):
    """Eval-mode outputs at the real tokens equal transformers' in fp32."""
    reference = make_transformers(model_dir).eval()
    model.eval()
    # bfloat16 keeps ~3 significant digits per op; six layers of them drift by about a percent.
    tol = dict(atol=1e-4, rtol=0) if precision == "fp32" else dict(atol=0.1, rtol=0.05)
    with torch.no_grad():
        for batch in batches:
            keep = batch["attention_mask"].bool()
            torch.testing.assert_close(forward(model, batch, precision).last_hidden_state[keep].float(),
                                       forward(reference, batch, "fp32").last_hidden_state[keep].float(), **tol)
    model.train()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", [(2048, 2048, 2048), (PROBE_TOKENS, 384, 384), (PROBE_TOKENS, 384, 1536),
                                   (PROBE_TOKENS, 1536, 384), (384, PROBE_TOKENS, 1536)],
                         ids=["2048^3", "qkv-out", "ffn-up", "ffn-down", "weight-grad"])
def test_matmul_rate(benchmark, matmul_probe, shape, precision):
    """The reference matrix-multiply rate: a large square product and the encoder's GEMM shapes
    (T = PROBE_TOKENS tokens; the last is a weight gradient, dW = dYᵀ X)."""
    matmul_probe(benchmark, *shape, precision)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_training_step(benchmark, sst_batches, encoder_dirs, encoder, row):
    batches = sst_batches[row.regime]
    model = make_model(row, encoder_dirs[encoder])
    if not row.compiled:  # a compiled row runs the same model; compiling it in eval mode costs a second graph
        check_outputs(model, encoder_dirs[encoder], batches, row.precision)
    model.train()

    def steps():
        for batch in batches:
            training_step(model, batch, row.precision)
        synchronize()

    start = time.perf_counter()
    steps()  # warm-up; compiles a compiled row (shapes marked dynamic: once for every batch length)
    warmup_s = time.perf_counter() - start
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    benchmark.group = group_name(encoder)
    benchmark.extra_info.update(
        impl=row.label(IMPL_NAMES), regime=REGIME_NAMES[row.regime], precision=row.precision, baseline=row.baseline,
        competent=row.competent, items=real_tokens, item_name="tokens", padding_fraction=padding_fraction(batches),
        gemm_flops=executed_gemm_flops(batches, unpadded=row.impl == "mtbert", config=model.config),
        gemm_flops_formula=GEMM_FLOPS_FORMULA)
    if row.compiled:
        benchmark.extra_info["compile_s"] = round(warmup_s, 1)
    if DEVICE.type == "cuda" and (row.impl, row.regime) in GPU_GOALS:
        benchmark.extra_info["goals"] = GPU_GOALS[row.impl, row.regime]
    benchmark.pedantic(steps, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def interleaved(threads, regime, batches, repeats, precision="fp32"):
    torch.set_num_threads(threads)
    batches = draw_sst_batches(regime, batches)
    rows = [StepRow(impl, regime, precision) for impl in ("transformers", "mtbert padded", "mtbert")]
    model_dir = resolve_model_dir(MINILM)
    models = {row.label(IMPL_NAMES): make_model(row, model_dir).train() for row in rows}
    # The same model once more, run with the PyTorch ops (the variable is read at each op call).
    kernels = {name: "auto" for name in models} | {"mtbert, PyTorch ops": "torch"}
    models["mtbert, PyTorch ops"] = make_model(rows[-1], model_dir).train()
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for repeat in range(repeats + 1):  # the first pass warms up and is not counted
        for batch in batches:
            for name, model in models.items():
                os.environ["MTBERT_KERNELS"] = kernels[name]
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                training_step(model, batch, precision)
                synchronize()
                if repeat:
                    wall[name].append(time.perf_counter() - start_wall)
                    cpu[name].append(time.process_time() - start_cpu)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"{len(batches)} {regime} batches of {BATCH_SIZE} SST sentences, padding fraction "
          f"{padding_fraction(batches):.3f}, {precision}, {threads} thread(s), {repeats} interleaved passes, "
          f"load average {os.getloadavg()[0]:.1f}; per pass of all batches, median over passes")
    baseline = rows[0].label(IMPL_NAMES)

    def per_pass(times):  # a pass's total: batches of different lengths weigh by their cost
        return statistics.median(sum(times[i:i + len(batches)]) for i in range(0, len(times), len(batches)))

    for name in models:
        w, c = per_pass(wall[name]), per_pass(cpu[name])
        print(f"{name:32s} wall {w:.3f} s/pass ({real / w:,.0f} tokens/s, {per_pass(wall[baseline]) / w:.2f}x)  "
              f"cpu {c:.3f} s/pass ({per_pass(cpu[baseline]) / c:.2f}x)")


def main(argv: Optional[list] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--regime", choices=REGIMES, default="random")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=list(AUTOCAST_DTYPES), default="fp32")
    args = parser.parse_args(argv)
    interleaved(args.threads, args.regime, args.batches, args.repeats, args.precision)


if __name__ == "__main__":
    sys.exit(main())
