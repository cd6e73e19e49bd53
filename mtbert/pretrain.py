"""``python -m mtbert.pretrain`` / ``mtbert-pretrain``: continued masked-LM pre-training of the
encoder on the sentences of the CS224N training files only (never dev or test text; the validation
split that mtbert-train holds out, same --val-fraction / --val-seed, is left out too). Writes a
``save_pretrained`` directory (config.json, model.safetensors, the tokenizer's files) that
``mtbert-train --model DIR`` fine-tunes, and prints its wall time: it counts in the training budget.

    python -m mtbert.pretrain --data data --out runs/mlm --minutes 10
    python -m mtbert.train ... --model runs/mlm

Exit status: 0 done; 2 a problem with what was given (told on one line; --debug adds the
traceback); 1 a bug.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import ConfigError, make_directory, run_command
from .pretrained import DEFAULT_MODEL

logger = logging.getLogger("mtbert.pretrain")


def build_parser():
    parser = argparse.ArgumentParser(prog="mtbert-pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("MTBERT_DATA", "data"),
                        help="directory holding the CS224N training files (default: $MTBERT_DATA or ./data)")
    parser.add_argument("--out", required=True, help="output directory (a save_pretrained directory)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="encoder to continue from (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="optimizer steps (stop at --steps or --minutes, the first)")
    parser.add_argument("--minutes", type=float, help="wall-clock minutes of training")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate, constant (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=128, help="truncation (default: %(default)s)")
    parser.add_argument("--mask-probability", type=float, default=0.15,
                        help="fraction of tokens predicted; of those 80%% [MASK], 10%% random, 10%% kept "
                             "(default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="the validation split mtbert-train will hold out, left out here too (default: "
                             "%(default)s; 0 with mtbert-train --select-on dev)")
    parser.add_argument("--val-seed", type=int, default=11711, help="its seed, as mtbert-train's (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=11711, help="(default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="tracebacks for errors in what was given")
    return parser


def _check(args):
    if args.steps is None and args.minutes is None:
        raise ConfigError("give --steps or --minutes (or both)")
    for name in ("steps", "minutes", "batch_size", "lr", "max_length"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if not 0 < args.mask_probability < 1:
        raise ConfigError(f"--mask-probability must be in (0, 1), got {args.mask_probability}")
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")


def run(args) -> int:
    from .multitask.mlm import MaskedLMTrainer, training_sentences

    _check(args)
    out = make_directory(Path(args.out), "--out")
    sentences = training_sentences(args.data, args.val_fraction, args.val_seed)
    logger.info("%d distinct training sentences (validation split of %.0f%% left out)", len(sentences),
                100 * args.val_fraction)
    trainer = MaskedLMTrainer(args.model, sentences, batch_size=args.batch_size, lr=args.lr,
                              max_length=args.max_length, seed=args.seed, mask_probability=args.mask_probability)
    result = trainer.fit(steps=args.steps, minutes=args.minutes, progress=args.progress)
    trainer.save(out)
    summary = {**result, "sentences": len(sentences), "model": args.model,
               "settings": {k: v for k, v in vars(args).items() if k not in ("progress", "debug")}}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"masked-LM pre-training: {result['steps']} steps in {result['wall_s'] / 60:.1f} min wall "
          f"(loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}); "
          f"fine-tune it with: python -m mtbert.train --model {out} ...")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return run_command("mtbert-pretrain", lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
