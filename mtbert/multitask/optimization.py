"""The gradient path of a multitask step, on ``mtbert.optim``: every trainable parameter lives in
one flat buffer; each task back-propagates into its own row of the [K, P] gradient buffer; the rows
are combined (sum / PCGrad / main+aux / MGDA / ..., two passes in C++); ``FusedAdamW`` updates the buffer in
one kernel per parameter group. The trainer sees only :class:`GradientPath`'s methods."""
import math
import re

import torch

from .. import distributed
from ..kernels import GradientSegments
from ..optim import ALIGNMENT, FlatParameters, FusedAdamW, make_weighting
from ..optim.combine import gradient_cosines
from ..optim.loss_weighting import LOSS_WEIGHTINGS, make_loss_weighting


def decay_groups(parameters, weight_decay):
    """AdamW parameter groups: no weight decay on biases and LayerNorm weights (1-D tensors), as
    in BERT's original fine-tuning recipe. Empty groups are left out."""
    parameters = list(parameters)
    groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def learning_rate_factors(model, layer_decay=1.0, head_lr_factor=1.0) -> dict:
    """{id(parameter): multiplier of the base learning rate} for every parameter of ``model``.

    Layer-wise decay (Howard & Ruder 2018; Sun et al. 2019, "How to fine-tune BERT", §5.3): the
    top encoder layer (and the pooler) gets the base rate, each layer below ``layer_decay`` times
    the one above, the embeddings ``layer_decay ** num_layers`` (lower layers hold general features
    that fine-tuning should move less). The heads get ``head_lr_factor``: freshly initialised, they
    can learn faster than the encoder."""
    layers = model.encoder.config.num_hidden_layers
    factors = {}
    for name, parameter in model.encoder.named_parameters():
        layer = re.match(r"encoder\.layer\.(\d+)\.", name)
        if layer:
            depth = int(layer.group(1)) + 1
        else:
            depth = 0 if name.startswith("embeddings.") else layers
        factors[id(parameter)] = layer_decay ** (layers - depth)
    for parameter in model.heads.parameters():
        factors[id(parameter)] = head_lr_factor
    return factors


def learning_rate_groups(parameters, lr, weight_decay, factors=None):
    """AdamW parameter groups of :func:`decay_groups`, split further by learning rate (``lr``
    times ``factors[id(p)]``, 1 when absent). With every factor 1 these are exactly
    :func:`decay_groups`' groups, so checkpoints of runs without the levers keep their layout."""
    factors = factors or {}
    groups = {}
    for index, group in enumerate(decay_groups(parameters, weight_decay)):
        for p in group["params"]:
            key = (-factors.get(id(p), 1.0), index)  # highest rate first, then decay_groups' order
            groups.setdefault(key, {"params": [], "lr": -lr * key[0], "weight_decay": group["weight_decay"]})
            groups[key]["params"].append(p)
    return [groups[key] for key in sorted(groups)]


class GradientPath:
    """Per-task backward (or one packed backward for all tasks), combination and the optimizer
    step for the trained tasks of ``model``.

    Rows of the gradient buffer follow ``config.tasks``; the shared segment is the encoder's
    trainable parameters (none with ``option='pretrain'``), then each task's head. Surgery applies to
    the shared segment; each head receives its own task's gradient. PCGrad's random projection
    order comes from a generator seeded with ``config.seed``; it and the method's own state (GradVac's
    cosine targets, Nash-MTL's last solution) are saved in checkpoints."""

    def __init__(self, model, config):
        groups = model.task_parameters()
        self.flat = FlatParameters(shared=groups["shared"], tasks={t: groups[t] for t in config.tasks},
                                   numel_multiple=self._numel_multiple())
        factors = learning_rate_factors(model, config.layer_lr_decay, (config.head_lr or config.lr) / config.lr)
        self.optimizer = self._make_optimizer(learning_rate_groups(self.flat.parameters(), config.lr,
                                                                   config.weight_decay, factors), config.lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.use_method(config)

    def use_method(self, config):
        """Builds the combination method of ``config`` (``grad_method`` and its parameters), with a
        fresh state. Made once per run: a stateful method keeps its state from step to step."""
        main = self.flat.task_index(config.main_task) if config.grad_method == "main-aux" else 0
        options = {"cagrad": {"c": config.cagrad_c}, "fairgrad": {"alpha": config.fairgrad_alpha},
                   "nash-mtl": {"max_norm": config.nash_max_norm},
                   "gradvac": {"beta": config.gradvac_beta}}.get(config.grad_method, {})
        if config.grad_method in LOSS_WEIGHTINGS:
            self.weighting = None
            self.loss_weighting = make_loss_weighting(config.grad_method, self.flat.num_tasks,
                                                      period=config.log_every, generator=self.generator)
        else:
            self.loss_weighting = None
            self.weighting = make_weighting(config.grad_method, generator=self.generator, main=main,
                                            aux_weight=config.aux_weight, **options)
        self.last_combination = None
        self.losses = {}

    def _numel_multiple(self):
        return 1

    def _make_optimizer(self, groups, lr):
        return FusedAdamW(groups, lr=lr)

    def zero_grad(self):
        self.optimizer.zero_grad()

    def backward(self, task, loss):
        """Accumulates the gradient of ``loss`` into ``task``'s row."""
        with self.flat.task(task):
            loss.backward()

    def task_segments(self, attention_mask, task_rows):
        """The context of one packed forward of several tasks' sequences: the encoder's ops write
        each task's shared-parameter gradients straight into its row (see
        ``mtbert.kernels.GradientSegments``). attention_mask: the packed batch's [B, L] mask;
        task_rows: {task: (begin, end)}, the batch rows holding that task's sequences, the tasks in
        row order (a task absent from it has no rows)."""
        offsets = [0]
        for task in self.flat.task_names:
            begin, end = task_rows.get(task, (offsets[-1], offsets[-1]))
            if begin != offsets[-1]:
                raise ValueError(f"task_rows must cover the batch rows in task order {self.flat.task_names}, "
                                 f"got {task_rows}")
            offsets.append(end)
        unknown = set(task_rows) - set(self.flat.task_names)
        if unknown:
            raise ValueError(f"task_rows names tasks without a gradient row: {sorted(unknown)}")
        return GradientSegments(attention_mask, offsets, self.flat.shared_row_views())

    def backward_packed(self, loss):
        """One backward of a sum of task losses computed inside :meth:`task_segments`: each head's
        gradient goes to its task's row, the shared gradients were routed by the encoder's ops."""
        with self.flat.own_rows():
            loss.backward()

    def observe_losses(self, losses):
        """The step's {task: loss}, which a loss-level weighting reads in :meth:`step` (a task
        without a batch this step counts as absent)."""
        self.losses = losses

    def _step_weighting(self):
        """The weighting of this step: the method's (Gram -> weights), or the loss weighting's
        weights of the observed losses, whatever the Gram."""
        if self.loss_weighting is None:
            return self.weighting
        values = torch.tensor([self.losses.get(task, math.nan) for task in self.flat.task_names], dtype=torch.float64)
        weights = self.loss_weighting.weights(values)
        return lambda gram: weights

    def step(self):
        """Combines the rows into the update direction, then one AdamW step."""
        self.last_combination = self.flat.combine(self._step_weighting())
        self.optimizer.step()

    def agree(self, step_losses, stop_requested):
        """(the step's losses ({task: loss}, or None when a non-finite loss skips the step), whether
        to stop after this step) as all processes see them: this process's own here."""
        return step_losses, stop_requested

    def record(self):
        """The last step's method weights and pairwise cosines of the task gradients on the shared
        parameters, for metrics.jsonl: {"grad_weights": {task: w}, "grad_cosines": {"a/b": cos}}."""
        if self.last_combination is None or self.flat.num_tasks < 2:
            return {}
        names = self.flat.task_names
        cosines = self._cosines()
        return {"grad_weights": dict(zip(names, self.last_combination.weights[0].tolist())),
                "grad_cosines": {f"{names[i]}/{names[j]}": cosines[i, j].item()
                                 for i in range(len(names)) for j in range(i + 1, len(names))}}

    def _cosines(self):
        return gradient_cosines(self.flat.grads, self.flat.boundaries, self.last_combination)

    def _method(self):
        return self.loss_weighting if self.loss_weighting is not None else self.weighting

    def state_dict(self):
        state = getattr(self._method(), "state_dict", None)
        return {"generator": self.generator.get_state(), "weighting": state() if state else {}}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        if hasattr(self._method(), "load_state_dict"):
            self._method().load_state_dict(state["weighting"])


class DistributedGradientPath(GradientPath):
    """The gradient path of one rank under torch.distributed (see ``mtbert.distributed``): the
    rows, holding this rank's share of each task's batch (losses weighted by the share), are
    reduce-scattered; the Gram matrix is all-reduced, so every rank derives the weights of the
    global rows; each rank combines and updates its column shard (optimizer state for about P/N
    columns), then the parameters are all-gathered."""

    def _numel_multiple(self):
        return distributed.rank_and_world_size()[1] * ALIGNMENT  # equal column shards

    def _make_optimizer(self, groups, lr):
        self.sharded = distributed.ShardedRows(self.flat)
        return FusedAdamW(groups, lr=lr, shard=self.sharded.shard, gather_shards=self.sharded.gather_shards)

    def step(self):
        self.sharded.reduce_scatter()
        self.last_combination = self.sharded.combine(self._step_weighting())
        self.optimizer.step()
        self.sharded.all_gather_parameters()

    def _cosines(self):
        """From the global Gram: the step's own, or (for a method that needs none, e.g. "sum") the
        shard's partial Gram all-reduced; every rank calls it, as every rank builds the record."""
        return gradient_cosines(self.sharded.rows, self.sharded.boundaries, self.last_combination,
                                reduce_gram=self.sharded.all_reduce_gram)

    def agree(self, step_losses, stop_requested):
        """The global losses of the step (each rank's share-weighted losses summed), or None on every
        rank when a loss was non-finite on any; and whether any rank was asked to stop, so that all
        stop after the same step: one small all-reduce."""
        names = self.flat.task_names
        values = torch.zeros(2 + 2 * len(names), dtype=torch.float64)
        values[1] = float(stop_requested)
        if step_losses is None:
            values[0] = 1.0
        else:
            for k, task in enumerate(names):
                if task in step_losses:
                    values[2 + k], values[2 + len(names) + k] = step_losses[task], 1.0
        values = distributed.all_reduce_sum(values.to(self.flat.params.device)).cpu()
        stop = bool(values[1] > 0)
        if values[0] > 0:
            return None, stop
        return {task: float(values[2 + k]) for k, task in enumerate(names) if values[2 + len(names) + k] > 0}, stop


def make_gradient_path(model, config) -> GradientPath:
    """The distributed path when a process group of several ranks runs, the plain one otherwise."""
    return DistributedGradientPath(model, config) if distributed.is_distributed() else GradientPath(model, config)
