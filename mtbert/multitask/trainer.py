"""The multitask training loop: one batch per task per step, per-task gradients combined by
sum / PCGrad / main+aux / MGDA / ... (``mtbert.optim``), an AdamW step, dev evaluation each epoch,
atomic checkpoints, exact resume."""
import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..encode import POOLINGS
from ..errors import CheckpointError, ConfigError, DataFileError, make_directory
from ..optim import METHOD_HELP, METHODS
from ..optim.loss_weighting import LOSS_WEIGHTING_HELP, LOSS_WEIGHTINGS
from ..pretrained import DEFAULT_MODEL
from ..tokenizer import Tokenizer
from . import evaluate as evaluation
from .checkpoint import kill_point, load_checkpoint, rng_states, save_checkpoint, set_rng_states
from .data import (DEFAULT_FILES, TASKS, LengthBucketSampler, TaskFile, collate, concat_inputs, example_lengths,
                   load_task_file, rank_share, split_validation)
from .heads import PAIR_HEADS
from .losses import STS_LOSSES
from .model import MultitaskBert
from .optimization import make_gradient_path
from .regularization import rdrop_objective
from .sampling import AdaptiveSampling

logger = logging.getLogger(__name__)

# Set to 1, --bf16 trains in bfloat16 on any CPU (the tests use it), not only one with bf16 units.
FORCE_CPU_BF16_ENV = "MTBERT_FORCE_CPU_BF16"
# /proc/cpuinfo flags of bf16 matrix units: AMX tiles (Intel Sapphire Rapids and later) and the
# AVX-512 BF16 dot products (Intel Cooper Lake, AMD Zen 4). Without them oneDNN emulates bfloat16
# matrix products, slower than float32's.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
TASK_SAMPLINGS = ("round-robin", "proportional", "annealed", "validation")
LR_SCHEDULES = ("constant", "linear", "cosine")
# packed: one encoder forward and backward over all task slots of a step, each task's gradient
# split into its row by the encoder's ops; per-task: one forward and backward per slot (the reference).
PASSES = ("packed", "per-task")
SELECTION_SPLITS = ("val", "dev")
# 2: the fused query/key/value parameter (one optimizer state instead of three), the loss window.
CHECKPOINT_FORMAT = 2


def setting(default=dataclasses.MISSING, *flags, group, help, default_factory=dataclasses.MISSING, **argparse):
    """A :class:`TrainConfig` field and its command-line flag(s) in one declaration: ``mtbert.train``
    builds its parser from this metadata (``flags`` default to ``--field-name``; ``argparse`` holds
    add_argument options such as ``choices``, ``type``, ``action``, ``metavar``; ``show_default=False``
    when the help states the default itself; ``per_key`` for dict fields with one flag per key;
    ``alias=(flag, {value: field value}, help)`` for a second spelling with its own values)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"cli": {"flags": flags, "group": group, "help": help, **argparse}})


def parse_task_list(text):
    """``"sst, sts"`` → ``("sst", "sts")``."""
    return tuple(task.strip() for task in text.split(",") if task.strip())


def parse_loss_weights(text):
    """``"sst=1,sts=0.05"`` → ``{"sst": 1.0, "sts": 0.05}``."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, sep, value = item.partition("=")
        task = task.strip()
        if not sep or task not in TASKS:
            raise ValueError(f"expected TASK=WEIGHT with TASK among {TASKS}, got {item!r}")
        try:
            weights[task] = float(value)
        except ValueError:
            raise ValueError(f"weight of {task!r} is not a number: {value!r}") from None
    return weights


_FILE_HELP = {"train": "training", "dev": "dev", "test": "unlabeled test-student"}
DATA_FILE_KEYS = {f"{task}_{split}": f"{task} {_FILE_HELP[split]} file (default: DATA/{DEFAULT_FILES[(task, split)]})"
                  for task in TASKS for split in ("train", "dev", "test")}
PREDICTION_FILE_KEYS = {f"{task}_{split}_out": f"{task} {split} predictions "
                                                f"(default: OUT/predictions/{task}-{split}-output.csv)"
                        for task in TASKS for split in ("dev", "test")}


@dataclass
class TrainConfig:
    """Every setting of a run; checkpoints store it. Each field declares its command-line flag
    (:func:`setting`), from which ``mtbert.train`` builds its parser."""
    data: str = setting("data", group="data", env="MTBERT_DATA", show_default=False,
                        help="directory holding the CS224N files (default: $MTBERT_DATA or ./data)")
    out: str = setting("runs/mtbert", group="run", help="output directory")
    tasks: tuple = setting(TASKS, group="data", type=parse_task_list, show_default=False,
                           help="comma-separated tasks to train (default: sst,para,sts)")
    # Data files; absent means DATA/<the CS224N starter's file name>. A missing test file only
    # means no test predictions for that task.
    files: dict = setting(group="data", default_factory=dict, per_key=DATA_FILE_KEYS, metavar="FILE",
                          help="data files (file names default to the CS224N starter's, inside --data)")
    prediction_files: dict = setting(group="data", default_factory=dict, per_key=PREDICTION_FILE_KEYS,
                                     metavar="FILE", help="prediction files")
    model: str = setting(DEFAULT_MODEL, group="model",
                         help=f"encoder: a name ({DEFAULT_MODEL} is bundled) or a local BERT checkpoint directory")
    pooling: str = setting("mean", group="model", choices=POOLINGS,
                           help="sentence vector: mean of the tokens, the raw [CLS] vector, or the [CLS] "
                                "pooler tanh(W·[CLS]) (the CS224N starter's pooler_output)")
    para_head: str = setting("sbert", "--para-head", group="model", choices=PAIR_HEADS,
                             help="paraphrase head: concat [u;v]→Linear, scaled cosine, "
                                  "sbert (u,v,|u−v|)→Linear, or cross (the pair encoded together)")
    sts_head: str = setting("sbert", "--sts-head", group="model", choices=PAIR_HEADS,
                            help="STS head, same choices")
    sts_loss: str = setting("mse", "--sts-loss", group="model", choices=STS_LOSSES,
                            help="STS loss: mse on 0–5, ce = BCE against similarity/5 (the paper's uniform "
                                 "cross-entropy), cosine-mse (SBERT), cosent (ranking)")
    # Task → multiplier of its loss (1.0 when absent). Balances tasks whose gradients differ in
    # size: CoSENT's encoder gradient is 30–60× SST's at the start of fine-tuning.
    loss_weights: dict = setting(group="optimization", default_factory=dict, type=parse_loss_weights,
                                 metavar="TASK=W[,TASK=W]", show_default=False,
                                 help="multiply a task's loss, e.g. sts=0.05 to bring CoSENT's large gradient to "
                                      "the size of the other tasks' (default: 1 for every task)")
    option: str = setting("finetune", group="optimization", choices=("pretrain", "finetune"),
                          alias=("--fine-tune-mode", {"last-linear-layer": "pretrain", "full-model": "finetune"},
                                 "the newer starter's name for --option: last-linear-layer = pretrain, "
                                 "full-model = finetune"),
                          help="pretrain: freeze the encoder, train the heads (the CS224N baseline); "
                               "finetune: train everything")
    hidden_dropout_prob: float = setting(0.3, "--hidden_dropout_prob", group="model",
                                         help="dropout of the encoder and the heads (the starter's default)")
    epochs: int = setting(10, group="optimization", help="training epochs (round-robin: passes over the largest task)")
    batch_size: int = setting(32, "--batch_size", group="optimization",
                              help="examples per task per step (under torchrun: of all processes together)")
    grad_accum: int = setting(1, group="optimization", metavar="STEPS",
                              help="split each step's batches into STEPS micro-batches, one forward and backward "
                                   "each, accumulated before the update: the same update in less memory")
    eval_batch_size: int = setting(128, group="optimization", help="examples per evaluation batch")
    lr: float = setting(None, group="optimization", show_default=False,
                        help="learning rate (default: 1e-3 with pretrain, 1e-5 with finetune, the starter's advice)")
    layer_lr_decay: float = setting(1.0, "--layer-lr-decay", group="optimization", metavar="D",
                                    help="layer-wise learning-rate decay: the top encoder layer trains at --lr, each "
                                         "layer below at D times the one above, the embeddings at D^layers "
                                         "(1: off; 0.8-0.95 is usual)")
    head_lr: float = setting(None, "--head-lr", group="optimization", show_default=False,
                             help="learning rate of the task heads (default: --lr)")
    weight_decay: float = setting(0.0, group="optimization",
                                  help="AdamW decoupled weight decay, not applied to biases and LayerNorm")
    warmup: float = setting(0.0, group="optimization",
                            help="fraction of all steps with a linear learning-rate warmup")
    schedule: str = setting("constant", group="optimization", choices=LR_SCHEDULES,
                            help="learning-rate schedule after warmup")
    grad_method: str = setting("sum", group="optimization", choices=METHODS + LOSS_WEIGHTINGS, metavar="METHOD",
                               help="how the task gradients combine: "
                                    + "; ".join(f"{name}: {line}"
                                                for name, line in {**METHOD_HELP, **LOSS_WEIGHTING_HELP}.items()))
    cagrad_c: float = setting(0.4, group="optimization", help="c, CAGrad's radius relative to the mean gradient")
    fairgrad_alpha: float = setting(1.0, group="optimization", help="α of FairGrad's α-fairness (1: proportional)")
    nash_max_norm: float = setting(1.0, group="optimization",
                                   help="Nash-MTL clips the update's norm to this (0: no clipping)")
    gradvac_beta: float = setting(0.5, group="optimization", help="β, GradVac's EMA rate of the cosine targets")
    main_task: str = setting("sst", group="optimization", choices=TASKS, help="main task of --grad-method main-aux")
    aux_weight: float = setting(0.3, group="optimization", help="λ, weight of the auxiliary tasks in main-aux")
    task_sampling: str = setting("round-robin", group="optimization", choices=TASK_SAMPLINGS,
                                 help="round-robin: one batch of every task per step, smaller tasks cycle; "
                                      "proportional to size; annealed (Stickland & Murray 2019); validation: "
                                      "after each evaluation, p_k = F/K + (1 - F) * g_k / sum(g), g_k = 1 - the "
                                      "task's validation score (accuracy, STS Pearson) clamped to [0, 1], "
                                      "F = --sampling-floor; uniform before the first evaluation")
    sampling_floor: float = setting(0.2, "--sampling-floor", group="optimization", metavar="F",
                                    help="--task-sampling validation: the share of the draws spread evenly over "
                                         "the tasks, so that none starves (1: uniform)")
    task_patience: int = setting(0, "--task-patience", group="optimization", metavar="N",
                                 help="per-task early stopping of the sampling: a task whose validation score has "
                                      "not improved for N evaluations is no longer drawn; training ends when every "
                                      "task has stopped (0: off)")
    rdrop: float = setting(0.0, group="optimization", metavar="ALPHA",
                           help="R-Drop (Liang et al. 2021): each task batch goes through the model twice with "
                                "different dropout masks; the loss is the mean of the two task losses plus ALPHA "
                                "times their symmetric KL divergence (STS regression: squared difference of the "
                                "two scores). 0: off")
    passes: str = setting("packed", group="optimization", choices=PASSES,
                          help="packed: one encoder forward and backward for all tasks of a step, each task's "
                               "gradient split by its tokens; per-task: one pass per task (the reference)")
    max_length: int = setting(128, group="data", help="truncate encodings to this many tokens")
    bucket: bool = setting(True, "--no-bucket", group="data", action="store_false",
                           help="plain shuffled batches instead of length-bucketed ones (more padding)")
    max_train_examples: int = setting(None, group="data", metavar="N", show_default=False,
                                      help="train on a seeded random subset of at most N examples per task")
    max_dev_examples: int = setting(None, group="data", metavar="N", show_default=False,
                                    help="evaluate on at most N dev (and validation) examples per task")
    # Choosing epochs and checkpoints on the dev set that is then reported flatters the report; a
    # validation split carved out of the training files keeps dev for one final measurement.
    val_fraction: float = setting(None, group="data", metavar="F", show_default=False,
                                  help="hold out a seeded random fraction F of each training file as the validation "
                                       "split that chooses the best checkpoint (default: 0.1; 0 with --select-on dev)")
    select_on: str = setting("val", group="data", choices=SELECTION_SPLITS,
                             help="split that chooses the best checkpoint: val (the held-out part of the training "
                                  "files; dev is scored once, for the final model) or dev (the CS224N habit: every "
                                  "training row is trained on, and dev both chooses and reports)")
    val_seed: int = setting(11711, group="data",
                            help="seed of the validation split's draw, apart from --seed so that runs with different "
                                 "seeds (and their ensembles) are chosen and compared on the same rows")
    keep_checkpoints: bool = setting(False, group="run", action="store_true",
                                     help="also keep the model of every evaluation as OUT/checkpoints/step-N.pt "
                                          "(about the encoder's size each), for checkpoint averaging with "
                                          "mtbert-predict --average-weights")
    eval_every: int = setting(0, group="run", metavar="N",
                              help="also evaluate the selection split every N steps within an epoch (best.pt can be "
                                   "a mid-epoch checkpoint), 0 for epoch ends only")
    seed: int = setting(11711, group="optimization", help="seed of every random draw")
    use_gpu: bool = setting(False, "--use_gpu", group="run", action="store_true",
                            help="train on CUDA when available")
    bf16: bool = setting(False, group="run", action="store_true",
                         help="bfloat16 autocast for the forward pass, float32 weights and optimizer: on CUDA, "
                              "or a CPU with bf16 matrix units (AMX or AVX-512 BF16; elsewhere a warning and "
                              "float32; MTBERT_FORCE_CPU_BF16=1 forces it)")
    save_every: int = setting(500, group="run",
                              help="steps between mid-epoch checkpoints, 0 for epoch ends only")
    log_every: int = setting(25, group="run", help="steps between training-loss records in metrics.jsonl")
    progress: bool = setting(True, "--no-progress", group="run", action="store_false", help="no progress bar")

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        for task in self.tasks:
            if task not in TASKS:
                raise ConfigError(f"tasks must be among {TASKS}, got {task!r}")
        if not self.tasks:
            raise ConfigError("tasks must name at least one task")
        checks = [("option", self.option, ("pretrain", "finetune")),
                  ("grad_method", self.grad_method, METHODS + LOSS_WEIGHTINGS),
                  ("task_sampling", self.task_sampling, TASK_SAMPLINGS), ("schedule", self.schedule, LR_SCHEDULES),
                  ("main_task", self.main_task, TASKS), ("pooling", self.pooling, POOLINGS),
                  ("para_head", self.para_head, PAIR_HEADS), ("sts_head", self.sts_head, PAIR_HEADS),
                  ("sts_loss", self.sts_loss, STS_LOSSES), ("passes", self.passes, PASSES),
                  ("select_on", self.select_on, SELECTION_SPLITS)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if self.grad_method == "main-aux" and self.main_task not in self.tasks:
            raise ConfigError(f"main_task {self.main_task!r} is not among the trained tasks {self.tasks}")
        for task, weight in self.loss_weights.items():
            if task not in self.tasks:
                raise ConfigError(f"loss_weights names {task!r}, which is not among the trained tasks {self.tasks}")
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"loss_weights[{task!r}] must be a positive finite number, got {weight}")
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_fraction is None:
            self.val_fraction = 0.1 if self.select_on == "val" else 0.0
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.select_on == "val" and self.val_fraction == 0.0:
            raise ConfigError("val_fraction 0 leaves no validation split to select on: give --val-fraction > 0, "
                              "or --select-on dev")
        if self.select_on == "dev" and self.val_fraction > 0.0:
            raise ConfigError(f"val_fraction {self.val_fraction} with select_on 'dev' would hold training rows out "
                              "and never use them: drop --val-fraction, or --select-on val")
        for name in ("save_every", "log_every", "eval_every"):
            if getattr(self, name) < 0 or (name == "log_every" and self.log_every == 0):
                raise ConfigError(f"{name} must be >= {int(name == 'log_every')}, got {getattr(self, name)}")
        for name, value, low, high in (("cagrad_c", self.cagrad_c, 0.0, math.inf),
                                       ("fairgrad_alpha", self.fairgrad_alpha, 0.0, math.inf),
                                       ("nash_max_norm", self.nash_max_norm, 0.0, math.inf),
                                       ("gradvac_beta", self.gradvac_beta, 0.0, 1.0)):
            if not low <= value <= high:
                raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.lr is None:
            self.lr = 1e-3 if self.option == "pretrain" else 1e-5
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive finite number, got {value}")
        if self.task_patience < 0:
            raise ConfigError(f"task_patience must be >= 0, got {self.task_patience}")
        if not 0.0 <= self.sampling_floor <= 1.0:
            raise ConfigError(f"sampling_floor must be in [0, 1], got {self.sampling_floor}")
        if not (math.isfinite(self.rdrop) and self.rdrop >= 0):
            raise ConfigError(f"rdrop must be a finite number >= 0, got {self.rdrop}")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")

    def file(self, task, split):
        path = self.files.get(f"{task}_{split}")
        return Path(path) if path else Path(self.data) / DEFAULT_FILES[(task, split)]

    def prediction_file(self, task, split):
        path = self.prediction_files.get(f"{task}_{split}_out")
        return Path(path) if path else Path(self.out) / "predictions" / f"{task}-{split}-output.csv"

    def to_dict(self):
        return dataclasses.asdict(self)


def task_probabilities(sizes, sampling, epoch, epochs):
    """Probability of drawing each task's batch: proportional to its size, or annealed
    (Stickland & Murray 2019): ∝ N^α with α = 1 − 0.8·(e − 1)/(E − 1), from proportional towards
    uniform over the epochs (e counted from 1); validation: uniform (its steps redraw by the
    validation scores, see ``mtbert.multitask.sampling``)."""
    if sampling == "proportional":
        alpha = 1.0
    elif sampling == "validation":
        alpha = 0.0
    else:
        alpha = 1.0 - 0.8 * epoch / (epochs - 1) if epochs > 1 else 1.0
    weights = [n ** alpha for n in sizes]
    return [w / sum(weights) for w in weights]


def epoch_plan(tasks, batches_per_task, sampling, epoch, epochs, seed):
    """The task slots of each step of an epoch: a list of steps, each a list of task names.

    Round-robin: every step has one batch of every task, for as many steps as the largest task has
    batches (the smaller tasks cycle). Proportional / annealed: as many steps as there are batches
    in all tasks divided by the number of tasks, each step holding that many batches drawn by task
    probability (a task drawn twice back-propagates twice into its gradient row; a task not drawn
    has a zero row)."""
    if sampling == "round-robin":
        return [list(tasks)] * max(batches_per_task.values())
    probabilities = task_probabilities([batches_per_task[t] for t in tasks], sampling, epoch, epochs)
    steps = math.ceil(sum(batches_per_task.values()) / len(tasks))
    rng = random.Random(f"{seed}-plan-{epoch}")
    return [sorted(rng.choices(tasks, probabilities, k=len(tasks)), key=tasks.index) for _ in range(steps)]


class TaskStream:
    """An endless stream of one task's training batches: pass after pass over its examples, each
    pass a fresh length-bucketed shuffle. Its position is two integers, so resuming is exact."""

    def __init__(self, sampler: LengthBucketSampler):
        self.sampler = sampler
        self.passes = 0
        self.position = 0
        self._cache = None

    def next(self):
        batches = self._batches()
        if self.position >= len(batches):
            self.passes, self.position = self.passes + 1, 0
            batches = self._batches()
        self.position += 1
        return batches[self.position - 1]

    def _batches(self):
        if self._cache is None or self._cache[0] != self.passes:
            self._cache = (self.passes, self.sampler.batches(self.passes))
        return self._cache[1]

    def state_dict(self):
        return {"passes": self.passes, "position": self.position}

    def load_state_dict(self, state):
        self.passes, self.position = state["passes"], state["position"]


def lr_lambda(schedule, warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def cpu_has_bf16_units(cpuinfo="/proc/cpuinfo") -> bool:
    """Whether the CPU lists one of CPU_BF16_FLAGS (False where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def _subset(examples, limit, seed, name):
    if limit is None or len(examples) <= limit:
        return examples
    rng = random.Random(f"{seed}-subset-{name}")
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), limit))]


def _evaluable(task_file, what):
    if len(task_file.examples) < 2:  # Pearson and accuracy need rows to compare
        raise DataFileError(f"the {what} has {len(task_file.examples)} usable row(s); evaluation needs at least 2")
    return task_file


def load_training_split(config, task) -> tuple:
    """``(train, validation)``: the :class:`TaskFile` of the rows of ``task`` that a run of
    ``config`` trains on, and the validation split it holds out of the same file (None with
    ``val_fraction`` 0). ``mtbert-predict --validation`` rebuilds the split with it."""
    train = load_task_file(task, config.file(task, "train"), labeled=True)
    if not train.examples:
        raise DataFileError(f"{train.path} has no usable training rows")
    # Drawn from the whole file, before --max-train-examples, and with --val-seed rather than
    # --seed: the same rows for every training subset and every seed of a configuration.
    try:
        kept, held_out = split_validation(train.examples, config.val_fraction, config.val_seed, f"{task}-train")
    except ValueError as err:
        raise DataFileError(f"{train.path}: {err}") from None
    train.examples = _subset(kept, config.max_train_examples, config.seed, f"{task}-train")
    if not held_out:
        return train, None
    val = TaskFile(task, train.path, _subset(held_out, config.max_dev_examples, config.val_seed, f"{task}-val"),
                   0, True)
    return train, _evaluable(val, f"validation split of {train.path}")


class TrainingStopped(Exception):
    """``fit()`` stopped early at a step boundary because :meth:`Trainer.request_stop` was called
    (the command line calls it on SIGINT / SIGTERM); ``checkpoint`` holds the state to resume from."""

    def __init__(self, reason, checkpoint, global_step):
        super().__init__(f"stopped by {reason} after step {global_step}; resume with --resume {checkpoint}")
        self.reason, self.checkpoint, self.global_step = reason, checkpoint, global_step


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`, then ``fit()``.

    ``on_step(trainer)`` (optional) is called after every optimizer step; raising from it stops
    the run there, like a kill (the tests use it to check that resuming is exact).
    ``request_stop(reason)`` makes ``fit()`` save a checkpoint at the next step boundary and raise
    :class:`TrainingStopped`."""

    def __init__(self, config: TrainConfig, model: MultitaskBert = None, tokenizer: Tokenizer = None, on_step=None):
        self.config = config
        self.on_step = on_step
        self.out = Path(config.out)
        # Under torchrun each rank trains on its share of every batch; rank 0 alone writes.
        self.rank, self.world_size = distributed.rank_and_world_size()
        self.is_main = self.rank == 0
        if (self.world_size > 1 or config.grad_accum > 1) and config.sts_loss == "cosent" and "sts" in config.tasks:
            warnings.warn("--sts-loss cosent ranks the pairs within a batch, here within each process's share "
                          "(torchrun) or micro-batch (--grad-accum): not the objective of whole batches (the other "
                          "losses are means over examples, split exactly)")
        self.device = torch.device("cuda" if config.use_gpu and torch.cuda.is_available() else "cpu")
        if config.use_gpu and self.device.type != "cuda":
            warnings.warn("--use_gpu given but CUDA is not available; training on the CPU")
        self.bf16 = config.bf16 and self._bf16_available()
        if self.bf16:
            logger.info("bfloat16 autocast on %s, float32 parameters, gradients and optimizer state", self.device)
        make_directory(self.out)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.tokenizer = tokenizer or Tokenizer.from_pretrained(config.model)
        self._load_data()
        self.model = model or MultitaskBert.from_pretrained(
            config.model, hidden_dropout_prob=config.hidden_dropout_prob, pooling=config.pooling,
            para_head=config.para_head, sts_head=config.sts_head, sts_loss=config.sts_loss)
        if config.option == "pretrain":
            self.model.freeze_encoder()
        self.model.to(self.device).train()
        self._build_streams()
        self.sampling = AdaptiveSampling(config.tasks, config.task_sampling, config.task_patience,
                                         config.sampling_floor, config.seed)
        self.gradients = make_gradient_path(self.model, config)
        self.optimizer = self.gradients.optimizer
        warmup_steps = int(config.warmup * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, warmup_steps, self.total_steps))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_overall, self.skipped_steps = -math.inf, 0
        self.train_seconds = 0.0  # wall time of the training steps and their checkpoints, no evaluation
        self.token_slots = {t: [0, 0] for t in config.tasks}  # real tokens, padded slots this epoch
        self.loss_window = {t: [0.0, 0] for t in config.tasks}  # loss sum, count since the last record
        self.stop_reason = None
        self.best = None  # best.pt's selection record (split, scores, epoch, step), set by finish()
        self._stop_agreed = False  # under torchrun: whether the last step's all-reduce carried a stop request

    def request_stop(self, reason="a stop request"):
        """Asks ``fit()`` to checkpoint and stop at the next step boundary (safe from a signal handler)."""
        self.stop_reason = reason

    def _stopping(self):
        """Whether to stop at this step boundary: on one process as soon as asked; under torchrun
        when the last step's all-reduce carried a request, so that every process stops after the same step."""
        return self.stop_reason is not None if self.world_size == 1 else self._stop_agreed

    # -- setup --------------------------------------------------------------------------------
    def _load_data(self):
        cfg = self.config
        self.train_sets, self.val_sets, self.dev_sets, self.test_sets = {}, {}, {}, {}
        for task in cfg.tasks:
            self.train_sets[task], val = load_training_split(cfg, task)
            if val is not None:
                self.val_sets[task] = val
            dev = load_task_file(task, cfg.file(task, "dev"), labeled=True)
            dev.examples = _subset(dev.examples, cfg.max_dev_examples, cfg.seed, f"{task}-dev")
            self.dev_sets[task] = _evaluable(dev, f"dev file {dev.path}")
            test_path = cfg.file(task, "test")
            if test_path.is_file():
                self.test_sets[task] = load_task_file(task, test_path, labeled=False)
            elif cfg.files.get(f"{task}_test"):
                raise FileNotFoundError(f"{task} test file {test_path} does not exist")
            else:
                logger.warning("no %s test file at %s: no %s test predictions", task, test_path, task)

    def _build_streams(self):
        cfg = self.config
        self.streams, self.batches_per_task, self.padding_fraction = {}, {}, {}
        for task, train in self.train_sets.items():
            lengths = example_lengths(train.examples, self.tokenizer, cfg.max_length, self.model.pair_mode(task))
            sampler = LengthBucketSampler(lengths, cfg.batch_size, shuffle=True, bucket=cfg.bucket,
                                          seed=f"{cfg.seed}-{task}")
            self.streams[task] = TaskStream(sampler)
            self.batches_per_task[task] = len(sampler)
            padding = sampler.padding_fraction(sampler.batches(0))
            logger.info("%s: %d training examples, %d batches/pass, about %.1f%% padding (%s)", task,
                        len(train), len(sampler), 100 * padding, "length-bucketed" if cfg.bucket else "random")
            self.padding_fraction[task] = padding
        self.plans = [epoch_plan(cfg.tasks, self.batches_per_task, cfg.task_sampling, e, cfg.epochs, cfg.seed)
                      for e in range(cfg.epochs)]
        self.total_steps = sum(len(plan) for plan in self.plans)

    def _bf16_available(self) -> bool:
        """Whether --bf16 can train in bfloat16 here; warns and says why not."""
        if self.device.type == "cuda" or os.environ.get(FORCE_CPU_BF16_ENV) == "1" or cpu_has_bf16_units():
            return True
        warnings.warn(f"--bf16: this CPU has no bfloat16 matrix units ({' or '.join(CPU_BF16_FLAGS)} in "
                      f"/proc/cpuinfo), where bfloat16 is slower than float32: training in float32. "
                      f"{FORCE_CPU_BF16_ENV}=1 forces bfloat16.")
        return False

    def _autocast(self):
        """bfloat16 autocast with --bf16 (the parameters, their gradients and the optimizer stay
        float32), a no-op context otherwise. Training, evaluation and prediction all run in it."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _prediction_options(self):
        """The options of every evaluation and prediction (dev each epoch, dev and test at the end)."""
        return dict(batch_size=self.config.eval_batch_size, max_length=self.config.max_length, device=self.device,
                    autocast=self._autocast)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self):
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "gradients": self.gradients.state_dict(),
            "streams": {task: stream.state_dict() for task, stream in self.streams.items()},
            "rng": rng_states(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_overall": self.best_overall, "skipped_steps": self.skipped_steps,
            "train_seconds": self.train_seconds,
            # So that metrics.jsonl after a resume equals an uninterrupted run's.
            "loss_window": self.loss_window, "token_slots": self.token_slots,
            "task_sampling": self.sampling.state_dict(),
        }

    @staticmethod
    def check_checkpoint(state, path):
        """Raises :class:`CheckpointError` unless ``state`` is a training checkpoint (``last.pt``)."""
        if "format" not in state and "model" in state and ("scores" in state or "dev" in state):
            raise CheckpointError(f"{path} is a best-model checkpoint (best.pt): it has no optimizer or sampler "
                                  "state to resume from; resume from last.pt in the same directory")
        if isinstance(state.get("format"), int) and state["format"] < CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} was written by an older mtbert (checkpoint format {state['format']}, "
                                  f"this version writes {CHECKPOINT_FORMAT}): its optimizer state predates the fused "
                                  "query/key/value parameter, so the run cannot resume; start a new run (the weights "
                                  "in its best.pt still load)")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a training checkpoint of mtbert-train (format "
                                  f"{state.get('format')!r}, expected {CHECKPOINT_FORMAT}); resume from OUT/last.pt")
        missing = [key for key in ("config", "model", "optimizer", "scheduler", "gradients", "streams", "rng",
                                   "epoch", "step_in_epoch", "global_step", "best_overall", "skipped_steps",
                                   "train_seconds", "loss_window", "token_slots") if key not in state]
        if missing:
            raise CheckpointError(f"{path} lacks {missing}: not a complete training checkpoint")

    def load_state_dict(self, state, path="the checkpoint"):
        self.check_checkpoint(state, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gradients.load_state_dict(state["gradients"])
        for task, stream_state in state["streams"].items():
            self.streams[task].load_state_dict(stream_state)
        set_rng_states(state["rng"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_overall = state["global_step"], state["best_overall"]
        self.skipped_steps = state["skipped_steps"]
        self.train_seconds = state["train_seconds"]
        self.loss_window = state["loss_window"]
        self.token_slots = state["token_slots"]
        if "task_sampling" in state:  # absent from checkpoints older than --task-patience
            self.sampling.load_state_dict(state["task_sampling"])

    def save(self, name="last.pt"):
        state = self.state_dict()  # every rank: the sharded optimizer state is gathered
        return save_checkpoint(state, self.out / name) if self.is_main else self.out / name

    def _truncate_metrics(self, step):
        """Drops the records a killed run wrote after its last checkpoint (all of them when this run
        starts from scratch in the same directory); they are redone."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [r for r in records if r["step"] <= step and r["kind"] != "final"]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def _record(self, **record):
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- training -----------------------------------------------------------------------------
    def train_step(self, tasks):
        """Draws the next batch of each task slot, then :meth:`run_step`."""
        return self.run_step(tasks, *zip(*(self._next_batch(task) for task in tasks)))

    def _next_batch(self, task):
        """This process's share of the next batch of ``task`` as --grad-accum collated
        micro-batches (an empty one, of fewer examples than processes, has ``inputs`` None)."""
        batch_indices = self.streams[task].next()
        indices = rank_share(batch_indices, self.rank, self.world_size)
        accum = self.config.grad_accum
        # Consecutive chunks: the share is sorted by length, so each micro-batch carries little padding.
        chunks = [indices[len(indices) * a // accum:len(indices) * (a + 1) // accum] for a in range(accum)]
        return [self._collate(task, chunk, len(batch_indices)) for chunk in chunks]

    def _collate(self, task, indices, global_size):
        if not indices:
            return {"inputs": None, "labels": torch.empty(0), "share": 0.0, "global_size": global_size}
        batch = collate([self.train_sets[task].examples[i] for i in indices], self.tokenizer,
                        self.model.pair_mode(task), self.config.max_length)
        # The micro-batch's fraction of the batch: its mean loss times it, summed over the micro-batches
        # of every process, is the batch's mean.
        batch["share"], batch["global_size"] = len(indices) / global_size, global_size
        mask = batch["inputs"]["attention_mask"]
        self.token_slots[task][0] += int(mask.sum())
        self.token_slots[task][1] += mask.numel()
        return batch

    def run_step(self, tasks, *micro_batches):
        """Forward + backward of each of ``micro_batches`` (each a list of one collated batch per
        task slot, as ``collate`` makes them; several with --grad-accum), in one packed pass or one
        pass per slot (``config.passes``), accumulated, then the combined update. Returns
        ({task: loss}, examples) or (None, examples) when a non-finite loss skipped the step."""
        self.gradients.zero_grad()
        examples = sum(batch.get("global_size", len(batch["labels"])) for batch in micro_batches[0])
        run = self._packed_pass if self.config.passes == "packed" else self._per_task_passes
        local_losses = {}
        for batches in micro_batches:
            slots = [(task, batch) for task, batch in zip(tasks, batches) if batch["inputs"] is not None]
            losses = run(*zip(*slots)) if slots else {}
            if losses is None:
                local_losses = None
                break
            for task, value in losses.items():
                local_losses[task] = local_losses.get(task, 0.0) + value
        step_losses, self._stop_agreed = self.gradients.agree(local_losses, self.stop_reason is not None)
        if self._stop_agreed and self.stop_reason is None:
            self.stop_reason = "a stop request to another process"
        if step_losses is None:
            if local_losses is not None:  # another rank's loss was non-finite
                self.skipped_steps += 1
            self.gradients.zero_grad()
            return None, examples
        self.gradients.observe_losses(step_losses)
        self.gradients.step()
        self.scheduler.step()
        return step_losses, examples

    def _finite(self, task, loss):
        """Whether ``loss`` is finite; if not, counts the skipped step and warns."""
        if torch.isfinite(loss):
            return True
        self.skipped_steps += 1
        warnings.warn(f"non-finite {task} loss at step {self.global_step}: step skipped ({self.skipped_steps} so far)")
        return False

    def _per_task_passes(self, tasks, batches):
        step_losses = {}
        for task, batch in zip(tasks, batches):
            inputs, offsets = batch["inputs"], None
            if self.config.rdrop:  # the batch twice in one forward: two dropout masks
                inputs, offsets = concat_inputs([inputs, inputs], self.model.encoder.config.pad_token_id)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with self._autocast():
                scores = (self.model.forward_packed([task, task], inputs, offsets) if offsets
                          else [self.model(task, inputs)])
            loss, objective = self._objective(task, scores, batch["labels"].to(self.device))
            if not self._finite(task, objective):
                return None
            self.gradients.backward(task, self._loss_weight(task, batch) * objective)
            step_losses[task] = step_losses.get(task, 0.0) + loss.item() * batch.get("share", 1.0)
        return step_losses

    def _objective(self, task, scores, labels):
        """(task loss, the loss to back-propagate) of one task slot from its head scores: of its one
        pass, or of its two passes with --rdrop (:func:`rdrop_objective`)."""
        if len(scores) == 1:
            loss = self.model.loss(task, scores[0].float(), labels)
            return loss, loss
        return rdrop_objective(self.model, task, scores[0].float(), scores[1].float(), labels, self.config.rdrop)

    def _packed_pass(self, tasks, batches):
        # Slots in gradient-row order, so that each task's sequences are one range of rows.
        slots = sorted(zip(tasks, batches), key=lambda slot: self.config.tasks.index(slot[0]))
        copies = 2 if self.config.rdrop else 1  # R-Drop: each slot twice in a row, in its task's range
        slots = [slot for slot in slots for _ in range(copies)]
        tasks = [task for task, _ in slots]
        inputs, offsets = concat_inputs([batch["inputs"] for _, batch in slots],
                                        self.model.encoder.config.pad_token_id)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        task_rows = {}
        for task, begin, end in zip(tasks, offsets, offsets[1:]):
            task_rows[task] = (task_rows.get(task, (begin,))[0], end)
        with self.gradients.task_segments(inputs["attention_mask"], task_rows), self._autocast():
            scores = self.model.forward_packed(tasks, inputs, offsets)
        slots = slots[::copies]  # one (task, batch) per slot, its scores[i * copies:(i + 1) * copies]
        losses, objectives = zip(*(self._objective(task, scores[i * copies:(i + 1) * copies],
                                                   batch["labels"].to(self.device))
                                   for i, (task, batch) in enumerate(slots)))
        if not all(self._finite(task, objective) for (task, _), objective in zip(slots, objectives)):
            return None
        self.gradients.backward_packed(sum(self._loss_weight(task, batch) * objective
                                           for objective, (task, batch) in zip(objectives, slots)))
        step_losses = {}
        for loss, (task, batch) in zip(losses, slots):
            step_losses[task] = step_losses.get(task, 0.0) + loss.item() * batch.get("share", 1.0)
        return step_losses

    def _loss_weight(self, task, batch):
        """--loss-weights' multiplier times this rank's share of the batch (1 on one process)."""
        return self.config.loss_weights.get(task, 1.0) * batch.get("share", 1.0)

    def fit(self):
        cfg = self.config
        if self.is_main:
            self._truncate_metrics(self.global_step)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        while self.epoch < cfg.epochs and not self.sampling.exhausted:
            self._run_epoch()
            if self._stopping() and self.epoch < cfg.epochs:
                raise TrainingStopped(self.stop_reason, self.out / "last.pt", self.global_step)  # saved at epoch end
        return self.finish()

    def _run_epoch(self):
        cfg = self.config
        plan = self.plans[self.epoch]
        if self.step_in_epoch == 0:  # a resumed epoch keeps the counts of its steps before the checkpoint
            self.token_slots = {t: [0, 0] for t in cfg.tasks}
        window = self.loss_window
        examples, started = 0, time.perf_counter()
        step_started = started
        bar = tqdm(total=len(plan), initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.is_main), dynamic_ncols=True)
        while self.step_in_epoch < len(plan) and not self.sampling.exhausted:
            tasks = self._step_tasks(plan[self.step_in_epoch])
            losses, n = self.train_step(tasks)
            examples += n
            self.step_in_epoch += 1
            self.global_step += 1
            for task, value in (losses or {}).items():
                # A task drawn k times in a step (proportional sampling) reports the sum of its k
                # batch losses: the window averages per batch.
                window[task][0] += value
                window[task][1] += tasks.count(task)
            speed = examples / (time.perf_counter() - started)
            if cfg.progress and self.is_main:
                bar.update(1)
                bar.set_postfix({**{t: f"{s / c:.3f}" for t, (s, c) in window.items() if c}, "ex/s": f"{speed:.0f}"})
            if self.global_step % cfg.log_every == 0 or self.step_in_epoch == len(plan):
                self._record(kind="train", epoch=self.epoch, step=self.global_step,
                             loss={t: s / c for t, (s, c) in window.items() if c}, examples_per_s=speed,
                             lr=self.scheduler.get_last_lr()[0], skipped_steps=self.skipped_steps,
                             **self.gradients.record())
                window = self.loss_window = {t: [0.0, 0] for t in cfg.tasks}
            if cfg.eval_every and self.global_step % cfg.eval_every == 0 and self.step_in_epoch < len(plan):
                evaluation_seconds = self._select()
                started += evaluation_seconds  # evaluation time is neither training time nor training speed
                step_started += evaluation_seconds
            if cfg.save_every and self.global_step % cfg.save_every == 0 and self.step_in_epoch < len(plan):
                self.save()
            self.train_seconds += time.perf_counter() - step_started
            if self.on_step is not None:
                self.on_step(self)
            kill_point("step", self.global_step)
            if self._stopping() and self.step_in_epoch < len(plan):
                bar.close()
                raise TrainingStopped(self.stop_reason, self.save(), self.global_step)
            step_started = time.perf_counter()
        bar.close()
        padding = {t: 1.0 - real / slots for t, (real, slots) in self.token_slots.items() if slots}
        logger.info("epoch %d padding (measured): %s", self.epoch + 1,
                    ", ".join(f"{t} {100 * f:.1f}% of token slots" for t, f in padding.items()))
        self._record(kind="padding", epoch=self.epoch, step=self.global_step, **padding)
        if not self.sampling.exhausted:  # else the evaluation that stopped the last task ended the epoch
            self._select()
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.save()

    def _select(self) -> float:
        """Evaluates the selection split (``config.select_on``), records the scores and writes
        ``best.pt`` when they are the best so far. Returns the seconds it took."""
        started = time.perf_counter()
        split = self.config.select_on
        scores, _ = self.evaluate(self.val_sets if split == "val" else self.dev_sets)
        plan_length = len(self.plans[self.epoch])
        epoch = self.epoch + 1 if self.step_in_epoch == plan_length else round(
            self.epoch + self.step_in_epoch / plan_length, 3)
        logger.info("%s after %d steps (epoch %s, %.1f min of training): %s", split, self.global_step, epoch,
                    self.train_seconds / 60, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        self._record(kind=split, epoch=epoch, step=self.global_step, train_minutes=self.train_seconds / 60, **scores)
        self._observe_for_sampling(scores)
        selection = evaluation.selection_score(scores)
        model = {"config": self.config.to_dict(), "encoder_config": self.model.encoder.config.to_dict(),
                 "model": self.model.state_dict(), "selected_on": split, "scores": scores, "epoch": epoch,
                 "step": self.global_step}
        if self.config.keep_checkpoints and self.is_main:
            save_checkpoint(model, self.out / "checkpoints" / f"step-{self.global_step}.pt")
        if selection > self.best_overall:
            self.best_overall = selection
            if self.is_main:
                save_checkpoint(model, self.out / "best.pt")
        return time.perf_counter() - started

    def _step_tasks(self, planned):
        """The task slots of the next step: the epoch plan's, unless --task-patience or
        --task-sampling validation redraws them (:class:`AdaptiveSampling`)."""
        cfg = self.config
        probabilities = None
        if self.sampling.stopped and cfg.task_sampling in ("proportional", "annealed"):
            values = task_probabilities([self.batches_per_task[t] for t in cfg.tasks], cfg.task_sampling,
                                        self.epoch, cfg.epochs)
            probabilities = dict(zip(cfg.tasks, values))
        return self.sampling.step_tasks(planned, self.global_step, probabilities)

    def _observe_for_sampling(self, scores):
        """Feeds an evaluation to the adaptive sampling; logs and records what it changed."""
        if not (self.config.task_patience or self.config.task_sampling == "validation"):
            return
        for task in self.sampling.observe(scores):
            logger.info("%s: no better validation score for %d evaluations: no longer drawn after step %d",
                        task, self.config.task_patience, self.global_step)
        if self.sampling.exhausted:
            logger.info("every task has stopped improving: training ends after step %d", self.global_step)
        self._record(kind="sampling", step=self.global_step, **self.sampling.record())

    def evaluate(self, sets=None, sharded=True):
        """Scores and predictions of ``sets`` (default: the dev sets). Under torchrun, ``sharded``:
        every process predicts its share of the examples (a collective: all call it); else this
        process predicts them all."""
        predictor = self._predict_shares if sharded and self.world_size > 1 else evaluation.predict
        return evaluation.evaluate(self.model, sets or self.dev_sets, self.tokenizer, predictor=predictor,
                                   **self._prediction_options())

    def _predict_shares(self, model, task, examples, tokenizer, **options):
        """:func:`evaluation.predict` of this process's share of ``examples``, the shares of all
        processes gathered back into the examples' order."""
        indices = rank_share(range(len(examples)), self.rank, self.world_size)
        mine = None
        if indices:
            mine = evaluation.predict(model, task, [examples[i] for i in indices], tokenizer, **options)
        shares = [(i, p) for i, p in distributed.all_gather_objects((indices, mine)) if i]
        order = torch.tensor([i for share, _ in shares for i in share])
        if not torch.equal(order.sort().values, torch.arange(len(examples))):
            raise RuntimeError(f"the processes' shares of the {task} examples do not cover them once each")
        predictions = torch.cat([p for _, p in shares])
        return torch.empty_like(predictions).index_copy_(0, order, predictions)

    def finish(self):
        """Reloads the best checkpoint (chosen on the selection split), scores it on dev (the one dev
        evaluation of a run that selects on the validation split), writes dev and test predictions
        and the plot. Returns the dev metrics; ``self.best`` holds best.pt's selection record.
        Under torchrun rank 0 alone does this (the other ranks return None)."""
        if not self.is_main:
            return None
        best = load_checkpoint(self.out / "best.pt")
        self.model.load_state_dict(best["model"])
        # A best.pt written before the validation split was chosen on dev and named its scores "dev".
        self.best = {"selected_on": best.get("selected_on", "dev"), "scores": best.get("scores", best.get("dev")),
                     "epoch": best["epoch"], "step": best.get("step", self.global_step)}
        scores, dev_predictions = self.evaluate(sharded=False)  # rank 0 alone gets here
        options = self._prediction_options()
        written = []
        for task, dev in self.dev_sets.items():
            written.append(evaluation.write_predictions(self.config.prediction_file(task, "dev"), task,
                                                        [e.id for e in dev.examples], dev_predictions[task]))
        for task, test in self.test_sets.items():
            predictions = evaluation.predict(self.model, task, test.examples, self.tokenizer, **options)
            written.append(evaluation.write_predictions(self.config.prediction_file(task, "test"), task,
                                                        [e.id for e in test.examples], predictions))
        self._record(kind="final", epoch=best["epoch"], step=self.global_step, best_step=self.best["step"],
                     selected_on=self.best["selected_on"], selection_scores=self.best["scores"], **scores)
        from .plot import plot_metrics

        plot = plot_metrics(self.out)
        logger.info("predictions: %s; plot: %s", ", ".join(map(str, written)), plot)
        return scores
