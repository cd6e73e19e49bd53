"""Reproduces the configurations of "Multitasking with BERT" (CS224N) as rows of one table.

Each row is one short ``mtbert.train`` run (``mtbert.train.main(argv)``, no training code here) on
a seeded subset of the CS224N files: ``--steps S`` optimizer steps of ``--batch-size B`` examples
per task (round-robin, so each task gets ``S·B`` seeded training examples, fewer where the file is
smaller and that task cycles). Each run holds out 10% of each training file as its validation split
(mtbert-train's default): compare rows on the validation overall score; dev (on the full dev sets
unless ``--max-dev-examples``) is scored once per row, for its best checkpoint.
After every row the markdown table (``--output``) is rewritten, so a killed run keeps the rows it
finished; results are merged by row name with those of earlier invocations (kept in a JSON file
next to the table), so ``--rows`` can add or redo single rows (``--rows ''`` only re-renders).

    python benchmarks/paper_table.py --steps 120                     # every row
    python benchmarks/paper_table.py --rows sbert,pcgrad --steps 120
    python benchmarks/paper_table.py --list
    python benchmarks/paper_table.py --rows pcgrad,mgda,upgrad --spread-seeds 2

The gradient-combination method rows (``mgda`` ... ``famo``) are the ``pcgrad`` row's setup with
another ``--grad-method``; choose among them on the validation column, never on dev.
``--spread-seeds S`` reruns the ``pcgrad`` row with S more seeds (the same validation rows) and
prints the seed-to-seed spread of its validation score, so that differences between rows can be
told from noise.

Runs on one thread by default (``--threads``): on a shared machine competing thread pools made
training steps ~30× slower.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Shared by every row: the paper's fine-tuning recipe at a step count a CPU affords.
COMMON = ["--epochs", "1", "--hidden_dropout_prob", "0.1", "--schedule", "linear", "--warmup", "0.1"]
FINETUNE_LR = ["--option", "finetune", "--lr", "1e-4"]
# The `make demo` setup (the cosine-mse row), the base of issue 15's accuracy levers.
DEMO = FINETUNE_LR + ["--para-head", "cross", "--sts-head", "cosine", "--sts-loss", "cosine-mse",
                      "--grad-method", "pcgrad"]

# (name, what the row tests, flags on top of COMMON). Order follows the paper's ablations.
ROWS = [
    ("pretrain", "pretrain-only baseline: frozen encoder, concat heads, STS MSE, sum",
     ["--option", "pretrain", "--lr", "1e-3", "--para-head", "concat", "--sts-head", "concat",
      "--sts-loss", "mse", "--grad-method", "sum"]),
    ("sum", "multitask fine-tuning, concat heads, STS MSE, gradients summed",
     FINETUNE_LR + ["--para-head", "concat", "--sts-head", "concat", "--sts-loss", "mse", "--grad-method", "sum"]),
    ("cosine", "cosine pair heads, STS MSE, sum",
     FINETUNE_LR + ["--para-head", "cosine", "--sts-head", "cosine", "--sts-loss", "mse", "--grad-method", "sum"]),
    ("sbert", "SBERT pair heads (u, v, |u−v|), STS MSE, sum",
     FINETUNE_LR + ["--para-head", "sbert", "--sts-head", "sbert", "--sts-loss", "mse", "--grad-method", "sum"]),
    ("sbert-ce", "SBERT heads, STS uniform cross-entropy, sum",
     FINETUNE_LR + ["--para-head", "sbert", "--sts-head", "sbert", "--sts-loss", "ce", "--grad-method", "sum"]),
    ("main-aux", "SBERT heads, STS CE, main (SST) + 0.3·aux instead of even sum",
     FINETUNE_LR + ["--para-head", "sbert", "--sts-head", "sbert", "--sts-loss", "ce", "--grad-method", "main-aux",
                    "--main-task", "sst", "--aux-weight", "0.3"]),
    ("pcgrad", "SBERT heads, STS CE, PCGrad (the paper's final setup)",
     FINETUNE_LR + ["--para-head", "sbert", "--sts-head", "sbert", "--sts-loss", "ce", "--grad-method", "pcgrad"]),
    ("cross", "cross-encoder pair heads, STS CE, PCGrad",
     FINETUNE_LR + ["--para-head", "cross", "--sts-head", "cross", "--sts-loss", "ce", "--grad-method", "pcgrad"]),
    ("cosent", "cross paraphrase head, cosine STS head with CoSENT, PCGrad (the first `make demo` setup)",
     FINETUNE_LR + ["--para-head", "cross", "--sts-head", "cosine", "--sts-loss", "cosent", "--grad-method", "pcgrad"]),
    # CoSENT's scale 20 makes its encoder gradient 30-60x the SST / paraphrase ones at the start
    # (measured on MiniLM), so it dominates the update; SBERT's cosine-MSE is of their size.
    ("cosine-mse", "cross paraphrase head, cosine STS head with SBERT's cosine-MSE, PCGrad (the `make demo` setup)",
     DEMO),
    # Learning-rate levers of issue 15, on top of the `make demo` setup.
    ("layer-decay", "the `make demo` setup with layer-wise learning-rate decay 0.9",
     DEMO + ["--layer-lr-decay", "0.9"]),
    ("head-lr", "the `make demo` setup with the heads at learning rate 1e-3",
     DEMO + ["--head-lr", "1e-3"]),
    # Regularization and sampling levers of issue 15, on the same setup.
    ("rdrop", "the `make demo` setup with R-Drop, alpha 1 (each batch twice, symmetric KL of the two passes)",
     DEMO + ["--rdrop", "1"]),
    # The sampling levers act after validation evaluations: every 15 steps, the same in their baseline.
    ("demo-eval15", "the `make demo` setup evaluated on the validation split every 15 steps (best.pt among its evaluations)",
     DEMO + ["--eval-every", "15"]),
    ("task-patience", "demo-eval15 with per-task early stopping of the sampling, patience 1 evaluation",
     DEMO + ["--eval-every", "15", "--task-patience", "1"]),
    ("validation-sampling", "demo-eval15 with task slots drawn by validation gap (floor 0.2) after each evaluation",
     DEMO + ["--eval-every", "15", "--task-sampling", "validation"]),
]
# The gradient-combination methods of issue 14 on the pcgrad row's setup (SBERT heads, STS CE).
METHOD_ROWS = ("mgda", "cagrad", "imtl-g", "aligned-mtl", "upgrad", "dualproj", "nash-mtl", "fairgrad", "gradvac",
               "uncertainty", "dwa", "rlw", "famo")
ROWS += [(method, f"SBERT heads, STS CE, --grad-method {method}",
          FINETUNE_LR + ["--para-head", "sbert", "--sts-head", "sbert", "--sts-loss", "ce", "--grad-method", method])
         for method in METHOD_ROWS]
ROW_NAMES = [name for name, _, _ in ROWS]


def train_argv(flags, data, out, steps, batch_size, seed, max_dev_examples=None):
    """The ``mtbert.train`` argument list of one row."""
    argv = ["--data", str(data), "--out", str(out), *COMMON, *flags, "--batch_size", str(batch_size),
            "--max-train-examples", str(steps * batch_size), "--seed", str(seed), "--save-every", "0",
            "--no-progress"]
    if max_dev_examples:
        argv += ["--max-dev-examples", str(max_dev_examples)]
    return argv


def final_record(out):
    """The run's best dev scores and its step count: the ``final`` record of its metrics.jsonl."""
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in records if r["kind"] == "final"][-1]


def load_results(store):
    return json.loads(store.read_text()) if store.is_file() else {}


def write_atomically(path, text):
    """Readers (and a concurrent invocation of this script) never see a half-written file."""
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _relative(argument):
    """Paths inside the checkout or next to it, written as from the repository root."""
    path = Path(argument)
    for base, prefix in ((REPO, "."), (REPO.parent, "..")):
        if path.is_absolute() and path.is_relative_to(base):
            return str(Path(prefix) / path.relative_to(base))
    return argument


def render(results, header) -> str:
    from mtbert.multitask.paper import PAPER_DEV

    lines = [header, "",
             "| row | configuration | steps | validation overall | SST acc | Quora acc | STS Pearson | overall | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(ROW_NAMES)}
    ranked = sorted(results.values(), key=lambda r: (order.get(r["row"].split("@")[0], len(order)), r["row"]))
    for r in ranked:
        s = r["scores"]
        # Rows run before the validation split chose their checkpoint on dev: no validation score.
        validation = f"{r['validation']['overall']:.3f}" if r.get("validation") else "–"
        lines.append(f"| {r['row']} | {r['description'].replace('|', chr(92) + '|')} | {r['steps']} | {validation} "
                     f"| {s['sst_acc']:.3f} | {s['para_acc']:.3f} "
                     f"| {s['sts_pearson']:.3f} | {s['overall']:.3f} | {r['wall_s'] / 60:.1f} min |")
    p = PAPER_DEV
    lines.append(f"| paper | BERT-base, GPU, full data (reported) | – | – | {p['sst_acc']:.3f} | {p['para_acc']:.3f} "
                 f"| {p['sts_pearson']:.3f} | {p['overall']:.3f} | – |")
    lines += seed_spread(results)
    lines += ["", "Commands (`python -m mtbert.train ...`, run with OMP_NUM_THREADS=1):", ""]
    lines += [f"- {r['row']}: `{' '.join(map(_relative, r['argv']))}`" for r in ranked]
    return "\n".join(lines) + "\n"


def seed_spread(results):
    """Lines stating the spread of the ``pcgrad`` row's validation overall score over its seeds
    (``pcgrad`` and ``pcgrad@SEED``; every seed holds out the same validation rows), or nothing when
    fewer than two seeds have one."""
    overall = [r["validation"]["overall"] for r in results.values()
               if r["row"].split("@")[0] == "pcgrad" and r.get("validation")]
    if len(overall) < 2:
        return []
    return ["", f"Seed-to-seed spread of the pcgrad row ({len(overall)} seeds, validation overall): "
                f"{min(overall):.3f}–{max(overall):.3f}, standard deviation {statistics.stdev(overall):.3f}; "
                "a difference between rows' validation scores smaller than this is noise."]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROW_NAMES),
                        help="comma-separated rows to run (default: all): " + ", ".join(ROW_NAMES))
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per row (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per task per step (default: %(default)s)")
    parser.add_argument("--data", default=os.environ.get("MTBERT_DATA", str(REPO.parent / "shared" / "data")),
                        help="CS224N data directory (default: $MTBERT_DATA or ../shared/data)")
    parser.add_argument("--max-dev-examples", type=int, help="evaluate on at most N dev examples per task")
    parser.add_argument("--spread-seeds", type=int, default=0, metavar="S",
                        help="also run the pcgrad row with S more seeds (seed + 1 ...) and print the spread")
    parser.add_argument("--seed", type=int, default=11711, help="(default: %(default)s)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "paper_table.md"),
                        help="markdown table (default: %(default)s); results also go to the same name .json")
    parser.add_argument("--runs", default=str(REPO / "runs" / "paper_table"),
                        help="directory of the rows' training outputs (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.list:
        for name, description, flags in ROWS:
            print(f"{name:10s} {description}\n{'':10s} {' '.join(flags)}")
        return 0
    rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in rows if name not in ROW_NAMES]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose among {ROW_NAMES}")
    if not (Path(args.data) / "ids-sst-train.csv").is_file():
        raise SystemExit(f"no CS224N data in {args.data}: point --data or $MTBERT_DATA at it "
                         "(python -m mtbert.data download --to DIR fetches it)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from mtbert import train

    torch.set_num_threads(args.threads)
    output = Path(args.output)
    store = output.with_suffix(".json")
    results = load_results(store)
    header = ("# Paper configurations on all-MiniLM-L6-v2 (CPU, short runs)\n\n"
              "Dev scores of `benchmarks/paper_table.py` rows: each row fine-tunes all-MiniLM-L6-v2 for the given "
              "number of optimizer steps (one batch of 16 per task per step, seeded training subsets), one "
              "epoch with linear decay and 10% warm-up, dropout 0.1, on a 2-core CPU shared with other jobs "
              "(one torch thread); wall time includes loading and evaluation. Rows with a validation score chose "
              "their checkpoint on a validation split (10% of each training file) and scored dev once; the others "
              "are older runs that trained on every row and chose on dev. Dev scores are on the full dev sets, or on a "
              "seeded subset of N examples per task where the row's command says `--max-dev-examples N`. These runs are far shorter "
              "than the paper's (BERT-base, GPU, several epochs on all data), so compare rows with each other.")
    flags_of = {name: (description, flags) for name, description, flags in ROWS}
    if results:  # `--rows ''` just re-renders the table from the stored results
        write_atomically(output, render(results, header))
    runs = [(name, args.seed) for name in rows]
    runs += [("pcgrad", args.seed + k) for k in range(1, args.spread_seeds + 1)]
    for name, seed in runs:
        description, flags = flags_of[name]
        key = name if seed == args.seed else f"{name}@{seed}"
        out = Path(args.runs) / key
        argv_row = train_argv(flags, args.data, out, args.steps, args.batch_size, seed, args.max_dev_examples)
        print(f"== {key}: python -m mtbert.train {' '.join(argv_row)}", flush=True)
        started = time.perf_counter()
        if out.exists():
            shutil.rmtree(out)  # a fresh run, never a resumed or appended one
        train.main(argv_row)
        wall = time.perf_counter() - started
        final = final_record(out)
        scores = {k: final[k] for k in ("sst_acc", "para_acc", "sts_pearson", "sts_spearman", "overall")}
        row = {"row": key, "description": description, "argv": argv_row, "steps": final["step"],
               "wall_s": wall, "scores": scores, "validation": final.get("selection_scores")}
        results = {**load_results(store), key: row}  # re-read: another invocation may have added rows
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(store, json.dumps(results, indent=1) + "\n")
        write_atomically(output, render(results, header))
        print(f"== {key}: {wall / 60:.1f} min, {scores}", flush=True)
    if output.is_file():
        print(output.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
