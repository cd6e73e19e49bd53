"""``python -m mtbert.train`` / ``mtbert-train``: multitask fine-tuning of one BERT encoder on
SST-5, Quora paraphrase and STS-B (the CS224N default final project), flags as in its starter
(``multitask_classifier.py``) where they exist.

Example (the `make demo` setting, about 12 minutes on a 2-core CPU):

    python -m mtbert.train --data data --out runs/demo --epochs 1 --max-train-examples 8000 \\
        --batch_size 16 --lr 1e-4 --hidden_dropout_prob 0.1 --para-head cross --sts-head cosine \\
        --sts-loss cosine-mse --grad-method pcgrad --schedule linear --warmup 0.1 --eval-every 125

Writes into OUT: metrics.jsonl, metrics.png, config.json, last.pt (every --save-every steps and
each epoch; --resume OUT/last.pt continues a killed run exactly), best.pt (best overall score on
the validation split, a seeded --val-fraction of each training file; --select-on dev chooses on
dev as the CS224N starter does), predictions/{sst,para,sts}-{dev,test}-output.csv in the starter's
leaderboard format. Dev is scored once, for best.pt; `mtbert-predict --checkpoint OUT/best.pt`
predicts any file with it and exports the encoder (--export DIR).

Exit status: 0 done; 2 a problem with what was given (a data file, a flag, a checkpoint, --out),
told on one line (--debug adds the traceback); 1 a bug (with its traceback); 130 / 143 stopped by
SIGINT (Ctrl-C) / SIGTERM (a cluster's pre-emption) after saving OUT/last.pt at the end of the
running step (a second signal stops at once; last.pt is still the previous complete one).
--resume OUT/last.pt continues with the settings stored in the checkpoint: repeating the run's
flags is fine, a flag that contradicts them is an error (only --no-progress and --grad-accum may differ).

Several processes (data-parallel, exact): ``torchrun --nproc_per_node N -m mtbert.train ...``;
--batch_size stays the global batch per task, each rank trains on its share; rank 0 alone prints
and writes (see README, "Distributed training").
"""
import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import torch

from . import distributed
from .errors import CheckpointError, ConfigError, run_command
from .multitask.data import write_synthetic_data
from .multitask.evaluate import summary_table
from .multitask.paper import PAPER_DEV
from .multitask.trainer import TrainConfig, TrainingStopped

logger = logging.getLogger("mtbert.train")

GROUPS = {"data": "data (file names default to the CS224N starter's, inside --data)", "model": "model",
          "optimization": "optimization", "run": "run"}
# Settings a resumed run may change: they do not change what is computed (--grad-accum: up to
# float rounding; it may have to change with the memory of the machine resuming).
RESUME_OVERRIDABLE = ("progress", "grad_accum")
_PATH_SETTINGS = ("data", "out", "files", "prediction_files")


class _MappedChoice(argparse.Action):
    """A second spelling of a setting with its own values (``--fine-tune-mode full-model`` sets option=finetune)."""

    def __init__(self, option_strings, dest, mapping, **kwargs):
        self.mapping = mapping
        super().__init__(option_strings, dest, choices=tuple(mapping), **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, self.mapping[value])


def _argparse_type(convert):
    """``convert`` for argparse, keeping the message of its ValueError (argparse would drop it)."""
    def parse(text):
        try:
            return convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _flag(field) -> str:
    return (field.metadata["cli"]["flags"] or (f"--{field.name.replace('_', '-')}",))[0]


def build_parser():
    """The parser, generated from :class:`TrainConfig`'s fields (their ``cli`` metadata) plus the
    flags that are not settings of a run (``--resume``, ``--synthetic``, ...). Absent flags are
    absent from the parsed namespace: the dataclass holds the defaults."""
    parser = argparse.ArgumentParser(prog="mtbert-train", description=__doc__, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    for field in dataclasses.fields(TrainConfig):
        spec = dict(field.metadata["cli"])
        group, help_text, flags = groups[spec.pop("group")], spec.pop("help"), spec.pop("flags")
        show_default, per_key = spec.pop("show_default", True), spec.pop("per_key", None)
        alias = spec.pop("alias", None)
        spec.pop("env", None)
        if per_key:
            for key, key_help in per_key.items():
                group.add_argument(f"--{key}", dest=f"{field.name}.{key}", help=key_help, **spec)
            continue
        if "action" not in spec:
            spec["type"] = _argparse_type(spec["type"]) if "type" in spec else field.type
            if show_default:
                default = field.default_factory() if field.default is dataclasses.MISSING else field.default
                help_text += f" (default: {default})"
        group.add_argument(_flag(field), dest=field.name, help=help_text.replace("%", "%%"), **spec)
        if alias:
            alias_flag, mapping, alias_help = alias
            group.add_argument(alias_flag, dest=field.name, action=_MappedChoice, mapping=mapping, help=alias_help)
    groups["data"].add_argument("--synthetic", action="store_true", default=False,
                                help="train on a small built-in synthetic sanity set (written to OUT/synthetic-data)")
    groups["data"].add_argument("--synthetic-if-missing", action="store_true", default=False,
                                help="use the synthetic set when the CS224N files are not found "
                                     "(what `make demo` does)")
    groups["run"].add_argument("--resume", metavar="CHECKPOINT", default=None,
                               help="continue a run from OUT/last.pt with the settings stored in it")
    groups["run"].add_argument("--dist-backend", choices=distributed.BACKENDS, default=None,
                               help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on the CPU)")
    groups["run"].add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                               help="how long a rank waits for the others in a collective before the job fails "
                                    "(default: %(default)s; the others wait while rank 0 writes checkpoints and "
                                    "predictions)")
    groups["run"].add_argument("--debug", action="store_true", default=False,
                               help="show the traceback of an error in what was given, not only its message")
    return parser


def settings_from_args(args) -> dict:
    """The :class:`TrainConfig` settings given on the command line (``files`` and
    ``prediction_files`` gathered from their per-file flags)."""
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    settings = {}
    for dest, value in vars(args).items():
        name, per_key, key = dest.partition(".")
        if per_key:
            settings.setdefault(name, {})[key] = value
        elif name in names:
            settings[name] = value
    return settings


def config_for_new_run(settings) -> TrainConfig:
    """The given settings, environment defaults (``--data``: $MTBERT_DATA) where not given, and
    the dataclass defaults for the rest."""
    for field in dataclasses.fields(TrainConfig):
        variable = field.metadata["cli"].get("env")
        if variable and field.name not in settings and os.environ.get(variable):
            settings = {**settings, field.name: os.environ[variable]}
    return TrainConfig(**settings)


def _comparable(name, value):
    if name not in _PATH_SETTINGS or value is None:
        return value
    return {k: os.path.normpath(v) for k, v in value.items()} if isinstance(value, dict) else os.path.normpath(value)


def config_for_resume(stored: dict, settings: dict, checkpoint) -> TrainConfig:
    """The checkpoint's settings; a given flag must agree with them (repeating the run's command
    with --resume is fine) except those in RESUME_OVERRIDABLE, which replace them. The data flags
    of a run on the synthetic set are not compared (its data moved to OUT/synthetic-data)."""
    flags = {field.name: field for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(stored) - set(flags))
    if unknown:
        raise CheckpointError(f"{checkpoint} holds settings this version does not know ({', '.join(unknown)}): "
                              "it was written by another version of mtbert")
    if "select_on" not in stored:  # written before the validation split: it trains on every row, selects on dev
        stored = {**stored, "select_on": "dev", "val_fraction": 0.0}
    stored = TrainConfig(**stored).to_dict()  # settings added since the checkpoint take their defaults
    synthetic = Path(stored["data"]).name == "synthetic-data"
    contradictions = []
    for name, value in settings.items():
        if name in RESUME_OVERRIDABLE or (synthetic and name in ("data", "files")):
            continue
        if flags[name].metadata["cli"].get("per_key"):
            pairs = [(f"--{key}", given, stored[name].get(key)) for key, given in value.items()]
        else:
            pairs = [(_flag(flags[name]), value, stored[name])]
        for flag, given, kept in pairs:
            if _comparable(name, given) != _comparable(name, kept):
                contradictions.append(f"{flag} {given} (the checkpoint has {kept})")
    if contradictions:
        raise ConfigError(f"--resume {checkpoint}: " + "; ".join(contradictions) + ". A resumed run keeps the "
                          "settings it started with: drop these flags, or start a new run with another --out")
    return TrainConfig(**{**stored, **{k: v for k, v in settings.items() if k in RESUME_OVERRIDABLE}})


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


@contextlib.contextmanager
def stop_on_signals(trainer, received):
    """While training, SIGINT / SIGTERM ask ``trainer`` to checkpoint and stop at the next step
    boundary (their numbers are appended to ``received``); a second one ends the process at once,
    by the signal's default action."""
    def handle(signum, frame):
        if received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        name = signal.Signals(signum).name
        logger.warning("%s: saving a checkpoint after this step, then stopping (send it again to stop at once)", name)
        trainer.request_stop(name)

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, handle) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _train(args) -> int:
    if not distributed.launched_with_several_ranks():
        return _train_process(args)
    if not args.dist_timeout > 0:
        raise ConfigError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    use_gpu = settings_from_args(args).get("use_gpu", False) and torch.cuda.is_available()
    distributed.init_process_group(torch.device("cuda" if use_gpu else "cpu"), args.dist_backend, args.dist_timeout)
    try:
        return _train_process(args)
    finally:
        torch.distributed.destroy_process_group()


def _train_process(args) -> int:
    from .multitask.checkpoint import load_checkpoint
    from .multitask.trainer import Trainer

    rank, _ = distributed.rank_and_world_size()
    settings = settings_from_args(args)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        Trainer.check_checkpoint(checkpoint, args.resume)
        config = config_for_resume(checkpoint["config"], settings, args.resume)
        logger.info("resuming %s at epoch %d, step %d, with the settings stored in the checkpoint",
                    args.resume, checkpoint["epoch"] + 1, checkpoint["global_step"])
        synthetic = Path(config.data).name == "synthetic-data"
    else:
        config = config_for_new_run(settings)
        synthetic = _use_synthetic(config, args)
        if synthetic:
            config.data = str(Path(config.out) / "synthetic-data")
            config.files = {}
            if rank == 0:
                write_synthetic_data(config.data)
            if distributed.is_distributed():
                torch.distributed.barrier()  # the other ranks read what rank 0 wrote
    trainer = Trainer(config)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint, args.resume)
    received = []
    with warnings.catch_warnings(), stop_on_signals(trainer, received):
        warnings.simplefilter("always")
        try:
            best = trainer.fit()
        except TrainingStopped as stopped:
            print(f"mtbert-train: {stopped}", file=sys.stderr)
            # A process that got no signal itself stopped with the others: as if it had been sent SIGTERM.
            return 128 + (received[0] if received else signal.SIGTERM)
    if rank != 0:
        return 0
    label = "SYNTHETIC sanity data" if synthetic else f"mtbert dev ({config.model})"
    chosen = trainer.best
    rows = [(label, best)]
    if chosen["selected_on"] == "val":
        rows.insert(0, (f"validation split (chose step {chosen['step']}, epoch {chosen['epoch']})", chosen["scores"]))
    print(summary_table(rows + ([] if synthetic else [("paper dev (BERT-base)", PAPER_DEV)])))
    print(f"training time: {trainer.train_seconds / 60:.1f} min (steps and checkpoints; evaluation excluded)")
    print(f"outputs in {config.out}: metrics.jsonl, metrics.png, best.pt, last.pt, predictions/")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    # Under torchrun only rank 0 logs; the others speak up for errors only.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.ERROR,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    body = lambda: _train(args)  # noqa: E731
    if distributed.launched_with_several_ranks():
        from torch.distributed.elastic.multiprocessing.errors import record

        body = record(body)  # torchrun's failure summary then shows the failing rank's traceback
    return run_command("mtbert-train", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
