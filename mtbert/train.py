"""``python -m mtbert.train`` / ``mtbert-train``: multitask fine-tuning of one BERT encoder on
SST-5, Quora paraphrase and STS-B (the CS224N default final project), flags as in its starter
(``multitask_classifier.py``) where they exist.

Example (the `make demo` setting, about 12 minutes on a 2-core CPU):

    python -m mtbert.train --data data --out runs/demo --epochs 1 --max-train-examples 8000 \\
        --batch_size 16 --lr 1e-4 --hidden_dropout_prob 0.1 --para-head cross --sts-head cosine \\
        --sts-loss cosine-mse --grad-method pcgrad --schedule linear --warmup 0.1

Writes into OUT: metrics.jsonl, metrics.png, config.json, last.pt (every --save-every steps and
each epoch; --resume OUT/last.pt continues a killed run exactly), best.pt (best dev overall
score), predictions/{sst,para,sts}-{dev,test}-output.csv in the starter's leaderboard format.
"""
import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from .multitask.data import DEFAULT_FILES, TASKS, write_synthetic_data
from .multitask.evaluate import summary_table
from .multitask.heads import PAIR_HEADS
from .multitask.losses import STS_LOSSES
from .multitask.optimization import GRAD_METHODS
from .multitask.trainer import LR_SCHEDULES, PASSES, TASK_SAMPLINGS, TrainConfig

logger = logging.getLogger("mtbert.train")

# "Multitasking with BERT", BERT-base, best configuration, official CS224N dev sets.
PAPER_DEV = {"sst_acc": 0.516, "para_acc": 0.797, "sts_pearson": 0.710}
PAPER_DEV["overall"] = (PAPER_DEV["sst_acc"] + PAPER_DEV["para_acc"] + (PAPER_DEV["sts_pearson"] + 1) / 2) / 3

_FILE_HELP = {"train": "training", "dev": "dev", "test": "unlabeled test-student"}


def parse_loss_weights(text):
    """``"sst=1,sts=0.05"`` → ``{"sst": 1.0, "sts": 0.05}``."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, sep, value = item.partition("=")
        task = task.strip()
        if not sep or task not in TASKS:
            raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT with TASK among {TASKS}, got {item!r}")
        try:
            weights[task] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {task!r} is not a number: {value!r}") from None
    return weights


def build_parser():
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="mtbert-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (file names default to the CS224N starter's, inside --data)")
    data.add_argument("--data", default=os.environ.get("MTBERT_DATA", "data"),
                      help="directory holding the CS224N files (default: $MTBERT_DATA or ./data)")
    for task in TASKS:
        for split in ("train", "dev", "test"):
            data.add_argument(f"--{task}_{split}", metavar="FILE",
                              help=f"{task} {_FILE_HELP[split]} file (default: DATA/{DEFAULT_FILES[(task, split)]})")
    for task in TASKS:
        for split in ("dev", "test"):
            data.add_argument(f"--{task}_{split}_out", metavar="FILE",
                              help=f"{task} {split} predictions (default: OUT/predictions/{task}-{split}-output.csv)")
    data.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks to train (default: %(default)s)")
    data.add_argument("--max-train-examples", type=int, metavar="N",
                      help="train on a seeded random subset of at most N examples per task")
    data.add_argument("--max-dev-examples", type=int, metavar="N", help="evaluate on at most N dev examples per task")
    data.add_argument("--max-length", type=int, default=defaults.max_length,
                      help="truncate encodings to this many tokens (default: %(default)s)")
    data.add_argument("--no-bucket", dest="bucket", action="store_false",
                      help="plain shuffled batches instead of length-bucketed ones (more padding)")
    data.add_argument("--synthetic", action="store_true",
                      help="train on a small built-in synthetic sanity set (written to OUT/synthetic-data)")
    data.add_argument("--synthetic-if-missing", action="store_true",
                      help="use the synthetic set when the CS224N files are not found (what `make demo` does)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=defaults.model,
                       help="encoder: a name (all-MiniLM-L6-v2 is bundled) or a local BERT checkpoint directory")
    model.add_argument("--pooling", choices=("mean", "cls"), default=defaults.pooling,
                       help="sentence vector: mean of the tokens, or the [CLS] pooler (default: %(default)s)")
    model.add_argument("--para-head", choices=PAIR_HEADS, default=defaults.para_head,
                       help="paraphrase head: concat [u;v]→Linear, scaled cosine, sbert (u,v,|u−v|)→Linear, "
                            "or cross (the pair encoded together) (default: %(default)s)")
    model.add_argument("--sts-head", choices=PAIR_HEADS, default=defaults.sts_head,
                       help="STS head, same choices (default: %(default)s)")
    model.add_argument("--sts-loss", choices=STS_LOSSES, default=defaults.sts_loss,
                       help="STS loss: mse on 0–5, ce = BCE against similarity/5 (the paper's uniform "
                            "cross-entropy), cosine-mse (SBERT), cosent (ranking) (default: %(default)s)")
    model.add_argument("--hidden_dropout_prob", type=float, default=defaults.hidden_dropout_prob,
                       help="dropout of the encoder and the heads (default: %(default)s, the starter's)")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--option", choices=("pretrain", "finetune"), default=defaults.option,
                       help="pretrain: freeze the encoder, train the heads (the CS224N baseline); "
                            "finetune: train everything (default: %(default)s)")
    optim.add_argument("--fine-tune-mode", choices=("last-linear-layer", "full-model"),
                       help="the newer starter's name for --option: last-linear-layer = pretrain, full-model = finetune")
    optim.add_argument("--epochs", type=int, default=defaults.epochs, help="(default: %(default)s)")
    optim.add_argument("--lr", type=float, help="learning rate (default: 1e-3 with pretrain, 1e-5 with finetune)")
    optim.add_argument("--batch_size", type=int, default=defaults.batch_size,
                       help="examples per task per step (default: %(default)s)")
    optim.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size, help="(default: %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                       help="AdamW decoupled weight decay, not applied to biases and LayerNorm (default: %(default)s)")
    optim.add_argument("--schedule", choices=LR_SCHEDULES, default=defaults.schedule,
                       help="learning-rate schedule after warmup (default: %(default)s)")
    optim.add_argument("--warmup", type=float, default=defaults.warmup,
                       help="fraction of all steps with a linear learning-rate warmup (default: %(default)s)")
    optim.add_argument("--grad-method", choices=GRAD_METHODS, default=defaults.grad_method,
                       help="how the task gradients combine: sum, pcgrad (Yu et al. 2020), main-aux "
                            "(Bi et al. 2022: PCGrad of the main task against λ·Σ auxiliary) (default: %(default)s)")
    optim.add_argument("--main-task", choices=TASKS, default=defaults.main_task,
                       help="main task of --grad-method main-aux (default: %(default)s)")
    optim.add_argument("--aux-weight", type=float, default=defaults.aux_weight,
                       help="λ, weight of the auxiliary tasks in main-aux (default: %(default)s)")
    optim.add_argument("--loss-weights", type=parse_loss_weights, default={}, metavar="TASK=W[,TASK=W]",
                       help="multiply a task's loss, e.g. sts=0.05 to bring CoSENT's large gradient to the size "
                            "of the other tasks' (default: 1 for every task)")
    optim.add_argument("--task-sampling", choices=TASK_SAMPLINGS, default=defaults.task_sampling,
                       help="round-robin: one batch of every task per step, smaller tasks cycle; proportional "
                            "to size; annealed (Stickland & Murray 2019) (default: %(default)s)")
    optim.add_argument("--passes", choices=PASSES, default=defaults.passes,
                       help="packed: one encoder forward and backward for all tasks of a step, each task's "
                            "gradient split by its tokens; per-task: one pass per task (the reference) "
                            "(default: %(default)s)")
    optim.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--out", default=defaults.out, help="output directory (default: %(default)s)")
    run.add_argument("--resume", metavar="CHECKPOINT",
                     help="continue a run from OUT/last.pt with the settings stored in it")
    run.add_argument("--use_gpu", action="store_true", help="train on CUDA when available")
    run.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (CUDA only)")
    run.add_argument("--save-every", type=int, default=defaults.save_every,
                     help="steps between mid-epoch checkpoints, 0 for epoch ends only (default: %(default)s)")
    run.add_argument("--log-every", type=int, default=defaults.log_every,
                     help="steps between training-loss records in metrics.jsonl (default: %(default)s)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def config_from_args(args) -> TrainConfig:
    option = args.option
    if args.fine_tune_mode:
        option = "pretrain" if args.fine_tune_mode == "last-linear-layer" else "finetune"
    files = {f"{task}_{split}": getattr(args, f"{task}_{split}") for task in TASKS for split in ("train", "dev", "test")}
    outputs = {f"{task}_{split}_out": getattr(args, f"{task}_{split}_out") for task in TASKS for split in ("dev", "test")}
    return TrainConfig(
        data=args.data, out=args.out, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        files={k: v for k, v in files.items() if v}, prediction_files={k: v for k, v in outputs.items() if v},
        model=args.model, pooling=args.pooling, para_head=args.para_head, sts_head=args.sts_head,
        sts_loss=args.sts_loss, loss_weights=args.loss_weights, option=option,
        hidden_dropout_prob=args.hidden_dropout_prob, epochs=args.epochs,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.schedule, grad_method=args.grad_method,
        main_task=args.main_task, aux_weight=args.aux_weight, task_sampling=args.task_sampling, passes=args.passes,
        max_length=args.max_length, bucket=args.bucket, max_train_examples=args.max_train_examples,
        max_dev_examples=args.max_dev_examples, seed=args.seed, use_gpu=args.use_gpu, bf16=args.bf16,
        save_every=args.save_every, log_every=args.log_every, progress=args.progress)


def _use_synthetic(config, args) -> bool:
    if args.synthetic:
        return True
    missing = [config.file(task, split) for task in config.tasks for split in ("train", "dev")
               if not config.file(task, split).is_file()]
    if missing and args.synthetic_if_missing:
        logger.warning(
            "CS224N data not found (%s). Get it with `python -m mtbert.data download --to data` (needs internet) "
            "or point --data / $MTBERT_DATA at it. Running on the SYNTHETIC sanity set instead: its scores say "
            "nothing about the real tasks.", ", ".join(map(str, missing[:3])))
        return True
    return False


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .multitask.checkpoint import load_checkpoint
    from .multitask.trainer import Trainer

    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        config = TrainConfig(**checkpoint["config"])
        logger.info("resuming %s at epoch %d, step %d, with the settings stored in the checkpoint",
                    args.resume, checkpoint["epoch"] + 1, checkpoint["global_step"])
        synthetic = Path(config.data).name == "synthetic-data"
    else:
        config = config_from_args(args)
        synthetic = _use_synthetic(config, args)
        if synthetic:
            config.data = str(write_synthetic_data(Path(config.out) / "synthetic-data"))
            config.files = {}
    trainer = Trainer(config)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        best = trainer.fit()
    label = "SYNTHETIC sanity data" if synthetic else f"mtbert dev ({config.model})"
    rows = [(label, best)] + ([] if synthetic else [("paper dev (BERT-base)", PAPER_DEV)])
    print(summary_table(rows))
    print(f"training time: {trainer.train_seconds / 60:.1f} min (steps and checkpoints; evaluation excluded)")
    print(f"outputs in {config.out}: metrics.jsonl, metrics.png, best.pt, last.pt, predictions/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
