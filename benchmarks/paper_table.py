"""Reproduces the configurations of "Multitasking with BERT" (CS224N) as rows of one table.

Each row is one short ``mtbert.train`` run (``mtbert.train.main(argv)``, no training code here) on
a seeded subset of the CS224N files: ``--steps S`` optimizer steps of ``--batch-size B`` examples
per task (round-robin, so each task gets ``S·B`` seeded training examples, fewer where the file is
smaller and that task cycles). Dev scores are on the full dev sets unless ``--max-dev-examples``.
After every row the markdown table (``--output``) is rewritten, so a killed run keeps the rows it
finished; results are merged by row name with those of earlier invocations (kept in a JSON file
next to the table), so ``--rows`` can add or redo single rows (``--rows ''`` only re-renders).

    python benchmarks/paper_table.py --steps 120                     # every row
    python benchmarks/paper_table.py --rows sbert,pcgrad --steps 120
    python benchmarks/paper_table.py --list
    python benchmarks/paper_table.py --rows pcgrad,mgda,upgrad --validation 1000 --spread-seeds 2

The gradient-combination method rows (``mgda`` ... ``famo``: the ``pcgrad`` row's setup with another
``--grad-method``) are meant to be scored with ``--validation N``: N records per task carved from
the training files (seeded, the same split for every row and seed) replace the dev sets, so that
choosing a method does not tune on dev. ``--spread-seeds S`` reruns the ``pcgrad`` row with S
more seeds and prints the seed-to-seed spread, so that differences between rows can be told from
noise.

Runs on one thread by default (``--threads``): on a shared machine competing thread pools made
training steps ~30× slower.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Shared by every row: the paper's fine-tuning recipe at a step count a CPU affords.
COMMON = ["--epochs", "1", "--hidden_dropout_prob", "0.1", "--schedule", "linear", "--warmup", "0.1"]
FINETUNE_LR = ["--option", "finetune", "--lr", "1e-4"]

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
     FINETUNE_LR + ["--para-head", "cross", "--sts-head", "cosine", "--sts-loss", "cosine-mse",
                    "--grad-method", "pcgrad"]),
]
# The gradient-combination methods of issue 14 on the pcgrad row's setup (SBERT heads, STS CE).
METHOD_ROWS = ("mgda", "cagrad", "imtl-g", "aligned-mtl", "upgrad", "dualproj", "nash-mtl", "fairgrad", "gradvac",
               "uncertainty", "dwa", "rlw", "famo")
ROWS += [(method, f"SBERT heads, STS CE, --grad-method {method}",
          FINETUNE_LR + ["--para-head", "sbert", "--sts-head", "sbert", "--sts-loss", "ce", "--grad-method", method])
         for method in METHOD_ROWS]
ROW_NAMES = [name for name, _, _ in ROWS]
# The validation split is the same for every row and seed.
VALIDATION_SEED = 0


def train_argv(flags, data, out, steps, batch_size, seed, max_dev_examples=None):
    """The ``mtbert.train`` argument list of one row."""
    argv = ["--data", str(data), "--out", str(out), *COMMON, *flags, "--batch_size", str(batch_size),
            "--max-train-examples", str(steps * batch_size), "--seed", str(seed), "--save-every", "0",
            "--no-progress"]
    if max_dev_examples:
        argv += ["--max-dev-examples", str(max_dev_examples)]
    return argv


def carve_validation(data, directory, examples):
    """Splits each task's training file (one record per line, as the CS224N files are) into
    ``directory/{task}-train.csv`` and ``{task}-validation.csv`` (``examples`` seeded random
    records); returns the ``mtbert.train`` flags that train on the first and score on the second."""
    from mtbert.multitask.data import DEFAULT_FILES, TASKS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flags = []
    for task in TASKS:
        source = Path(data) / DEFAULT_FILES[(task, "train")]
        header, *records = source.read_text(encoding="utf-8").splitlines(keepends=True)
        if not 0 < examples < len(records):
            raise SystemExit(f"--validation {examples}: {source} has {len(records)} records")
        chosen = set(random.Random(f"{VALIDATION_SEED}-{task}").sample(range(len(records)), examples))
        paths = {split: directory / f"{task}-{split}.csv" for split in ("train", "validation")}
        for split, keep in (("train", False), ("validation", True)):
            paths[split].write_text(header + "".join(r for i, r in enumerate(records) if (i in chosen) == keep),
                                    encoding="utf-8")
        flags += [f"--{task}_train", str(paths["train"]), f"--{task}_dev", str(paths["validation"])]
    return flags


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
             "| row | configuration | steps | SST acc | Quora acc | STS Pearson | overall | wall time | scored on |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(ROW_NAMES)}
    ranked = sorted(results.values(), key=lambda r: (order.get(r["row"].split("@")[0], len(order)), r["row"]))
    for r in ranked:
        s = r["scores"]
        lines.append(f"| {r['row']} | {r['description'].replace('|', chr(92) + '|')} | {r['steps']} | {s['sst_acc']:.3f} | {s['para_acc']:.3f} "
                     f"| {s['sts_pearson']:.3f} | {s['overall']:.3f} | {r['wall_s'] / 60:.1f} min "
                     f"| {r.get('scored_on', 'dev')} |")
    p = PAPER_DEV
    lines.append(f"| paper | BERT-base, GPU, full data (reported) | – | {p['sst_acc']:.3f} | {p['para_acc']:.3f} "
                 f"| {p['sts_pearson']:.3f} | {p['overall']:.3f} | – | dev |")
    lines += seed_spread(results)
    lines += ["", "Commands (`python -m mtbert.train ...`, run with OMP_NUM_THREADS=1):", ""]
    lines += [f"- {r['row']}: `{' '.join(map(_relative, r['argv']))}`" for r in ranked]
    return "\n".join(lines) + "\n"


def seed_spread(results):
    """Lines stating the spread of the ``pcgrad`` row over its seeds (``pcgrad`` and ``pcgrad@SEED``
    results scored on the same set), or nothing when it ran with one seed."""
    runs = [r for r in results.values() if r["row"].split("@")[0] == "pcgrad"]
    for scored_on in sorted({r.get("scored_on", "dev") for r in runs}):
        overall = [r["scores"]["overall"] for r in runs if r.get("scored_on", "dev") == scored_on]
        if len(overall) > 1:
            return ["", f"Seed-to-seed spread of the pcgrad row ({len(overall)} seeds, {scored_on}): overall "
                        f"{min(overall):.3f}–{max(overall):.3f}, standard deviation {statistics.stdev(overall):.3f}; "
                        "a difference between rows smaller than this is noise."]
    return []


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROW_NAMES),
                        help="comma-separated rows to run (default: all): " + ", ".join(ROW_NAMES))
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per row (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per task per step (default: %(default)s)")
    parser.add_argument("--data", default=os.environ.get("MTBERT_DATA", str(REPO.parent / "shared" / "data")),
                        help="CS224N data directory (default: $MTBERT_DATA or ../shared/data)")
    parser.add_argument("--max-dev-examples", type=int, help="evaluate on at most N dev examples per task")
    parser.add_argument("--validation", type=int, default=0, metavar="N",
                        help="score on N records per task carved from the training files instead of dev")
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
              "(one torch thread); wall time includes loading and dev evaluation. Dev scores are on the full dev sets, or on a "
              "seeded subset of N examples per task where the row's command says `--max-dev-examples N`; rows whose "
              "'scored on' says validation are scored on records carved from the training files (and trained on the "
              "rest) instead. These runs are far shorter "
              "than the paper's (BERT-base, GPU, several epochs on all data), so compare rows with each other.")
    flags_of = {name: (description, flags) for name, description, flags in ROWS}
    if results:  # `--rows ''` just re-renders the table from the stored results
        write_atomically(output, render(results, header))
    validation_flags = carve_validation(args.data, Path(args.runs) / "_validation", args.validation) \
        if args.validation else []
    scored_on = f"validation ({args.validation}/task)" if args.validation else "dev"
    runs = [(name, args.seed) for name in rows]
    runs += [("pcgrad", args.seed + k) for k in range(1, args.spread_seeds + 1)]
    for name, seed in runs:
        description, flags = flags_of[name]
        key = name if seed == args.seed else f"{name}@{seed}"
        out = Path(args.runs) / key
        argv_row = train_argv(flags, args.data, out, args.steps, args.batch_size, seed, args.max_dev_examples)
        argv_row += validation_flags
        print(f"== {key}: python -m mtbert.train {' '.join(argv_row)}", flush=True)
        started = time.perf_counter()
        if out.exists():
            shutil.rmtree(out)  # a fresh run, never a resumed or appended one
        train.main(argv_row)
        wall = time.perf_counter() - started
        final = final_record(out)
        scores = {k: final[k] for k in ("sst_acc", "para_acc", "sts_pearson", "sts_spearman", "overall")}
        row = {"row": key, "description": description, "argv": argv_row, "steps": final["step"],
               "wall_s": wall, "scores": scores, "scored_on": scored_on}
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
