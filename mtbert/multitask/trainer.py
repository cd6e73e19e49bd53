"""The multitask training loop: one batch per task per step, per-task gradients combined by
sum / PCGrad / main+aux, an AdamW step, dev evaluation each epoch, atomic checkpoints, exact resume."""
import dataclasses
import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..tokenizer import Tokenizer
from . import evaluate as evaluation
from .checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from .data import DEFAULT_FILES, TASKS, LengthBucketSampler, collate, concat_inputs, example_lengths, load_task_file
from .model import MultitaskBert
from .optimization import GRAD_METHODS, make_gradient_path

logger = logging.getLogger(__name__)

TASK_SAMPLINGS = ("round-robin", "proportional", "annealed")
LR_SCHEDULES = ("constant", "linear", "cosine")
# packed: one encoder forward and backward over all task slots of a step, each task's gradient
# split into its row by the encoder's ops; per-task: one forward and backward per slot (the reference).
PASSES = ("packed", "per-task")
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Every setting of a run; the command line (``mtbert.train``) fills it, checkpoints store it."""
    data: str = "data"
    out: str = "runs/mtbert"
    tasks: tuple = TASKS
    # Data files; None means DATA/<the CS224N starter's file name>. A missing test file only
    # means no test predictions for that task.
    files: dict = field(default_factory=dict)
    prediction_files: dict = field(default_factory=dict)
    model: str = "all-MiniLM-L6-v2"
    pooling: str = "mean"
    para_head: str = "sbert"
    sts_head: str = "sbert"
    sts_loss: str = "mse"
    # Task → multiplier of its loss (1.0 when absent). Balances tasks whose gradients differ in
    # size: CoSENT's encoder gradient is 30–60× SST's at the start of fine-tuning.
    loss_weights: dict = field(default_factory=dict)
    option: str = "finetune"
    hidden_dropout_prob: float = 0.3
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = None  # None: 1e-3 for "pretrain", 1e-5 for "finetune" (the starter's advice)
    weight_decay: float = 0.0
    warmup: float = 0.0  # fraction of all steps
    schedule: str = "constant"
    grad_method: str = "sum"
    main_task: str = "sst"
    aux_weight: float = 0.3
    task_sampling: str = "round-robin"
    passes: str = "packed"
    max_length: int = 128
    bucket: bool = True
    max_train_examples: int = None  # per task, a seeded random subset
    max_dev_examples: int = None
    seed: int = 11711
    use_gpu: bool = False
    bf16: bool = False
    save_every: int = 500  # steps between mid-epoch checkpoints (0: only at epoch ends)
    log_every: int = 25
    progress: bool = True

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"tasks must be among {TASKS}, got {task!r}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        checks = [("option", self.option, ("pretrain", "finetune")), ("grad_method", self.grad_method, GRAD_METHODS),
                  ("task_sampling", self.task_sampling, TASK_SAMPLINGS), ("schedule", self.schedule, LR_SCHEDULES),
                  ("main_task", self.main_task, TASKS), ("passes", self.passes, PASSES)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.grad_method == "main-aux" and self.main_task not in self.tasks:
            raise ValueError(f"main_task {self.main_task!r} is not among the trained tasks {self.tasks}")
        for task, weight in self.loss_weights.items():
            if task not in self.tasks:
                raise ValueError(f"loss_weights names {task!r}, which is not among the trained tasks {self.tasks}")
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"loss_weights[{task!r}] must be a positive finite number, got {weight}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.lr is None:
            self.lr = 1e-3 if self.option == "pretrain" else 1e-5

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
    uniform over the epochs (e counted from 1)."""
    if sampling == "proportional":
        alpha = 1.0
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


def _subset(examples, limit, seed, name):
    if limit is None or len(examples) <= limit:
        return examples
    rng = random.Random(f"{seed}-subset-{name}")
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), limit))]


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`, then ``fit()``.

    ``on_step(trainer)`` (optional) is called after every optimizer step; raising from it stops
    the run there, like a kill (the tests use it to check that resuming is exact)."""

    def __init__(self, config: TrainConfig, model: MultitaskBert = None, tokenizer: Tokenizer = None, on_step=None):
        self.config = config
        self.on_step = on_step
        self.out = Path(config.out)
        self.device = torch.device("cuda" if config.use_gpu and torch.cuda.is_available() else "cpu")
        if config.use_gpu and self.device.type != "cuda":
            warnings.warn("--use_gpu given but CUDA is not available; training on the CPU")
        if config.bf16 and self.device.type != "cuda":
            raise ValueError("--bf16 needs a CUDA device (--use_gpu on a machine with a GPU)")
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
        self.gradients = make_gradient_path(self.model, config)
        self.optimizer = self.gradients.optimizer
        warmup_steps = int(config.warmup * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, warmup_steps, self.total_steps))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_overall, self.skipped_steps = -math.inf, 0
        self.train_seconds = 0.0  # wall time of the training steps and their checkpoints, no evaluation
        self._best_dev = None  # (epoch, dev metrics, dev predictions) of the best epoch run here
        self.token_slots = {t: [0, 0] for t in config.tasks}  # real tokens, padded slots this epoch

    # -- setup --------------------------------------------------------------------------------
    def _load_data(self):
        cfg = self.config
        self.train_sets, self.dev_sets, self.test_sets = {}, {}, {}
        for task in cfg.tasks:
            train = load_task_file(task, cfg.file(task, "train"), labeled=True)
            train.examples = _subset(train.examples, cfg.max_train_examples, cfg.seed, f"{task}-train")
            if not train.examples:
                raise ValueError(f"{train.path} has no usable training rows")
            self.train_sets[task] = train
            dev = load_task_file(task, cfg.file(task, "dev"), labeled=True)
            dev.examples = _subset(dev.examples, cfg.max_dev_examples, cfg.seed, f"{task}-dev")
            self.dev_sets[task] = dev
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

    def _autocast(self):
        if self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

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
        }

    def load_state_dict(self, state):
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}")
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
        self.train_seconds = state.get("train_seconds", 0.0)
        self._truncate_metrics(self.global_step)

    def save(self, name="last.pt"):
        return save_checkpoint(self.state_dict(), self.out / name)

    def _truncate_metrics(self, step):
        """Drops the records a killed run wrote after its last checkpoint; they are redone."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [r for r in records if r["step"] <= step and r["kind"] != "final"]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def _record(self, **record):
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- training -----------------------------------------------------------------------------
    def train_step(self, tasks):
        """Draws the next batch of each task slot, then :meth:`run_step`."""
        return self.run_step(tasks, [self._next_batch(task) for task in tasks])

    def _next_batch(self, task):
        indices = self.streams[task].next()
        batch = collate([self.train_sets[task].examples[i] for i in indices], self.tokenizer,
                        self.model.pair_mode(task), self.config.max_length)
        mask = batch["inputs"]["attention_mask"]
        self.token_slots[task][0] += int(mask.sum())
        self.token_slots[task][1] += mask.numel()
        return batch

    def run_step(self, tasks, batches):
        """Forward + backward of ``batches`` (one collated batch per task slot, as ``collate``
        makes them), in one packed pass or one pass per slot (``config.passes``), then the
        combined update. Returns ({task: loss}, examples) or (None, examples) when a non-finite
        loss skipped the step."""
        self.gradients.zero_grad()
        examples = sum(len(batch["labels"]) for batch in batches)
        run = self._packed_pass if self.config.passes == "packed" else self._per_task_passes
        step_losses = run(tasks, batches)
        if step_losses is None:
            self.gradients.zero_grad()
            return None, examples
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
            inputs = {k: v.to(self.device) for k, v in batch["inputs"].items()}
            with self._autocast():
                scores = self.model(task, inputs)
            loss = self.model.loss(task, scores.float(), batch["labels"].to(self.device))
            if not self._finite(task, loss):
                return None
            self.gradients.backward(task, self.config.loss_weights.get(task, 1.0) * loss)
            step_losses[task] = step_losses.get(task, 0.0) + loss.item()
        return step_losses

    def _packed_pass(self, tasks, batches):
        # Slots in gradient-row order, so that each task's sequences are one range of rows.
        slots = sorted(zip(tasks, batches), key=lambda slot: self.config.tasks.index(slot[0]))
        tasks = [task for task, _ in slots]
        inputs, offsets = concat_inputs([batch["inputs"] for _, batch in slots],
                                        self.model.encoder.config.pad_token_id)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        task_rows = {}
        for task, begin, end in zip(tasks, offsets, offsets[1:]):
            task_rows[task] = (task_rows.get(task, (begin,))[0], end)
        with self.gradients.task_segments(inputs["attention_mask"], task_rows), self._autocast():
            scores = self.model.forward_packed(tasks, inputs, offsets)
        losses = [self.model.loss(task, task_scores.float(), batch["labels"].to(self.device))
                  for task, task_scores, (_, batch) in zip(tasks, scores, slots)]
        if not all(self._finite(task, loss) for task, loss in zip(tasks, losses)):
            return None
        self.gradients.backward_packed(sum(self.config.loss_weights.get(task, 1.0) * loss
                                           for task, loss in zip(tasks, losses)))
        step_losses = {}
        for task, loss in zip(tasks, losses):
            step_losses[task] = step_losses.get(task, 0.0) + loss.item()
        return step_losses

    def fit(self):
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        while self.epoch < cfg.epochs:
            self._run_epoch()
        return self.finish()

    def _run_epoch(self):
        cfg = self.config
        plan = self.plans[self.epoch]
        window = {t: [0.0, 0] for t in cfg.tasks}  # loss sum, count since the last record
        self.token_slots = {t: [0, 0] for t in cfg.tasks}  # real tokens, padded slots this epoch
        examples, started = 0, time.perf_counter()
        step_started = started
        bar = tqdm(total=len(plan), initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, dynamic_ncols=True)
        while self.step_in_epoch < len(plan):
            losses, n = self.train_step(plan[self.step_in_epoch])
            examples += n
            self.step_in_epoch += 1
            self.global_step += 1
            for task, value in (losses or {}).items():
                window[task][0] += value
                window[task][1] += 1
            speed = examples / (time.perf_counter() - started)
            if cfg.progress:
                bar.update(1)
                bar.set_postfix({**{t: f"{s / c:.3f}" for t, (s, c) in window.items() if c}, "ex/s": f"{speed:.0f}"})
            if self.global_step % cfg.log_every == 0 or self.step_in_epoch == len(plan):
                self._record(kind="train", epoch=self.epoch, step=self.global_step,
                             loss={t: s / c for t, (s, c) in window.items() if c}, examples_per_s=speed,
                             lr=self.scheduler.get_last_lr()[0], skipped_steps=self.skipped_steps)
                window = {t: [0.0, 0] for t in cfg.tasks}
            if cfg.save_every and self.global_step % cfg.save_every == 0 and self.step_in_epoch < len(plan):
                self.save()
            self.train_seconds += time.perf_counter() - step_started
            if self.on_step is not None:
                self.on_step(self)
            step_started = time.perf_counter()
        bar.close()
        padding = {t: 1.0 - real / slots for t, (real, slots) in self.token_slots.items() if slots}
        logger.info("epoch %d padding (measured): %s", self.epoch + 1,
                    ", ".join(f"{t} {100 * f:.1f}% of token slots" for t, f in padding.items()))
        self._record(kind="padding", epoch=self.epoch, step=self.global_step, **padding)
        scores, predictions = self.evaluate()
        logger.info("epoch %d dev after %.1f min of training: %s", self.epoch + 1, self.train_seconds / 60,
                    ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        self._record(kind="dev", epoch=self.epoch + 1, step=self.global_step,
                     train_minutes=self.train_seconds / 60, **scores)
        selection = scores.get("overall", sum(scores.values()) / len(scores))
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if selection > self.best_overall:
            self.best_overall = selection
            self._best_dev = (self.epoch, scores, predictions)
            save_checkpoint({"config": self.config.to_dict(), "model": self.model.state_dict(), "dev": scores,
                             "epoch": self.epoch}, self.out / "best.pt")
        self.save()

    def evaluate(self, sets=None):
        return evaluation.evaluate(self.model, sets or self.dev_sets, self.tokenizer,
                                   batch_size=self.config.eval_batch_size, max_length=self.config.max_length,
                                   device=self.device, autocast=self._autocast if self.config.bf16 else None)

    def finish(self):
        """Reloads the best checkpoint, writes dev and test predictions, the plot, and returns the
        best dev metrics."""
        best = load_checkpoint(self.out / "best.pt")
        self.model.load_state_dict(best["model"])
        if self._best_dev is not None and self._best_dev[0] == best["epoch"]:
            _, scores, dev_predictions = self._best_dev  # evaluated by this process already
        else:
            scores, dev_predictions = self.evaluate()
        options = dict(batch_size=self.config.eval_batch_size, max_length=self.config.max_length, device=self.device)
        written = []
        for task, dev in self.dev_sets.items():
            written.append(evaluation.write_predictions(self.config.prediction_file(task, "dev"), task,
                                                        [e.id for e in dev.examples], dev_predictions[task]))
        for task, test in self.test_sets.items():
            predictions = evaluation.predict(self.model, task, test.examples, self.tokenizer, **options)
            written.append(evaluation.write_predictions(self.config.prediction_file(task, "test"), task,
                                                        [e.id for e in test.examples], predictions))
        self._record(kind="final", epoch=best["epoch"], step=self.global_step, **scores)
        from .plot import plot_metrics

        plot = plot_metrics(self.out)
        logger.info("predictions: %s; plot: %s", ", ".join(map(str, written)), plot)
        return scores
