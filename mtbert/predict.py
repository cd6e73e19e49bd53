"""``mtbert-predict`` / ``python -m mtbert.predict``: predictions of a trained multitask model for
any CS224N-format files, in the starter's leaderboard format, with the metrics of the files that
have labels; and the export of the fine-tuned encoder and its heads.

    mtbert-predict --checkpoint runs/demo/best.pt --sst data/ids-sst-dev.csv \\
        --para data/quora-dev.csv --sts data/sts-test-student.csv --out preds
    mtbert-predict --checkpoint runs/demo/best.pt --export my-model
    mtbert-predict --checkpoint runs/seed*/best.pt --sst data/ids-sst-dev.csv --out preds   # an ensemble

Writes OUT/<file name without .csv>-output.csv per file and, when a file has labels,
OUT/metrics.json (and the summary table on stdout). --export DIR writes the encoder with
save_pretrained (config.json, model.safetensors and the tokenizer: loadable by transformers'
BertModel and mtbert.BertModel) and the heads beside it (heads.safetensors, heads.json);
--checkpoint also accepts such a directory.

From Python:

    from mtbert.predict import Predictor
    model = Predictor.load("runs/demo/best.pt")
    model.predict("sst", ["A gorgeous, witty, seductive movie."])       # a tensor of classes 0-4
    model.predict("sts", [("A man plays guitar.", "A man is playing a guitar.")])   # similarities 0-5

Exit status: 0 done; 2 a problem with what was given (told on one line naming the flag; --debug
adds the traceback); 1 a bug.
"""
import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, UserError, make_directory, run_command
from .multitask.data import TASK_SPECS, TASKS, load_task_file
from .multitask.evaluate import summary_table, write_predictions
from .multitask.predictor import Ensemble, Predictor, average_weights

__all__ = ["Ensemble", "Predictor", "average_weights", "main"]


def build_parser():
    parser = argparse.ArgumentParser(prog="mtbert-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="PATH",
                        help="a run's best.pt (or last.pt), or a directory written by --export; several (e.g. "
                             "one run per seed) predict as an ensemble that averages their head scores")
    for task in TASKS:
        parser.add_argument(f"--{task}", type=Path, metavar="FILE",
                            help=f"a {TASK_SPECS[task].description} file in the CS224N format (labels optional)")
    parser.add_argument("--average-weights", action="store_true",
                        help="with several --checkpoint of one run (--keep-checkpoints): one model with their mean "
                             "weights instead of an ensemble")
    parser.add_argument("--validation", action="store_true",
                        help="also score the validation split the run held out of its training files (rebuilt "
                             "from the settings in the checkpoint: files, --val-fraction, --val-seed)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="directory for the prediction files and metrics.json")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="write the encoder (save_pretrained) and the heads into DIR")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per batch (default: 128)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast, as mtbert-train --bf16 evaluates: reproduces a --bf16 run's own "
                             "prediction files (default: float32)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--use_gpu", action="store_true", help="predict on CUDA when available")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error in what was given")
    return parser


def _naming(flag, action):
    """Runs ``action()``; a :class:`UserError` it raises is raised again, same type, its message
    starting with ``flag``."""
    try:
        return action()
    except UserError as err:
        raise type(err)(f"{flag}: {err}") from err


def _output_names(files) -> dict:
    """{task: prediction file name}: the input's name, .csv replaced by -output.csv."""
    names = {task: f"{path.name.removesuffix('.csv')}-output.csv" for task, path in files.items()}
    if len(set(names.values())) < len(names):
        raise ConfigError(f"input files with the same name would write the same prediction file: {files}; "
                          "rename one")
    return names


def _validation_sets(members, paths, tasks) -> dict:
    """{task: TaskFile} of the validation split the checkpoints' runs held out; they must agree on it."""
    from .multitask.trainer import load_training_split
    from .train import config_for_resume

    configs = []
    for member, path in zip(members, paths):
        if member.run_config is None:
            raise ConfigError(f"{path} is an exported model: its run's settings (and validation split) are not "
                              "in it; give the run's best.pt")
        configs.append(config_for_resume(member.run_config, {}, path))
    split = [(c.tasks, {t: str(c.file(t, "train")) for t in c.tasks}, c.val_fraction, c.val_seed, c.max_dev_examples)
             for c in configs]
    if any(s != split[0] for s in split):
        raise ConfigError("the checkpoints' runs held out different validation splits (training files, "
                          "--val-fraction, --val-seed or --max-dev-examples differ); score them one by one")
    if configs[0].val_fraction == 0:
        raise ConfigError(f"{paths[0]} was trained on every training row (--select-on dev): it has no validation split")
    return {task: load_training_split(configs[0], task)[1] for task in tasks}


def _predict(args) -> int:
    import torch

    files = {task: getattr(args, task) for task in TASKS if getattr(args, task) is not None}
    if not files and args.export is None and not args.validation:
        raise ConfigError("nothing to do: give --sst, --para or --sts FILE (with --out DIR), --validation "
                          "or --export DIR")
    if files and args.out is None:
        raise ConfigError("--out DIR is required with --sst, --para or --sts")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = "cuda" if args.use_gpu and torch.cuda.is_available() else "cpu"
    if args.export is not None and len(args.checkpoint) > 1 and not args.average_weights:
        raise ConfigError("--export writes one model: give one --checkpoint, or --average-weights")
    members = [_naming("--checkpoint", lambda path=path: Predictor.load(path, device=device,
                                                                        batch_size=args.batch_size))
               for path in args.checkpoint]
    for member in members:
        member.progress, member.bf16 = args.progress, args.bf16
    if len(members) == 1:
        predictor = members[0]
    elif args.average_weights:
        predictor = _naming("--average-weights", lambda: average_weights(members))
    else:
        predictor = _naming("--checkpoint", lambda: Ensemble(members))
    predictor.progress, predictor.bf16 = args.progress, args.bf16
    if args.export is not None:
        print(f"exported to {_naming('--export', lambda: predictor.export(args.export))}")
    if args.validation:
        validation = _naming("--validation", lambda: _validation_sets(members, args.checkpoint, predictor.tasks))
        scores, _ = predictor.score(validation)
        if args.out is not None:
            out = _naming("--out", lambda: make_directory(args.out))
            (out / "validation-metrics.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
        print(summary_table([(f"validation split: {' + '.join(args.checkpoint)}", scores)]))
    if not files:
        return 0
    task_files = {task: _naming(f"--{task}", lambda task=task: load_task_file(task, path))
                  for task, path in files.items()}
    untrained = [task for task in task_files if task not in predictor.tasks]
    if untrained:
        raise ConfigError(f"--{untrained[0]}: the model was not trained on {untrained[0]!r} "
                          f"(its tasks: {', '.join(predictor.tasks)})")
    names = _output_names(files)
    out = _naming("--out", lambda: make_directory(args.out))
    scores, predictions = predictor.score(task_files)
    for task, task_file in task_files.items():
        path = write_predictions(out / names[task], task, [e.id for e in task_file.examples], predictions[task])
        print(f"{task}: {len(task_file)} predictions in {path}")
    if scores:
        (out / "metrics.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
        print(summary_table([(" + ".join(args.checkpoint), scores)]))
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_command("mtbert-predict", lambda: _predict(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
