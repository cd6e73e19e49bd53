"""The gradient path of a multitask step, on ``mtbert.optim``: every trainable parameter lives in
one flat buffer; each task back-propagates into its own row of the [K, P] gradient buffer; the rows
are combined (sum / PCGrad / main+aux / MGDA / ..., two passes in C++); ``FusedAdamW`` updates the buffer in
one kernel per parameter group. The trainer sees only :class:`GradientPath`'s methods."""
import math

import torch

from ..kernels import GradientSegments
from ..optim import FlatParameters, FusedAdamW, make_weighting
from ..optim.combine import gradient_cosines
from ..optim.loss_weighting import LOSS_WEIGHTINGS, make_loss_weighting


def decay_groups(parameters, weight_decay):
    """AdamW parameter groups: no weight decay on biases and LayerNorm weights (1-D tensors), as
    in BERT's original fine-tuning recipe. Empty groups are left out."""
    parameters = list(parameters)
    groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


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
        self.flat = FlatParameters(shared=groups["shared"], tasks={t: groups[t] for t in config.tasks})
        self.optimizer = FusedAdamW(decay_groups(self.flat.parameters(), config.weight_decay), lr=config.lr)
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

    def step(self):
        """Combines the rows into the update direction, then one AdamW step."""
        weighting = self.weighting
        if self.loss_weighting is not None:
            values = torch.tensor([self.losses.get(task, math.nan) for task in self.flat.task_names],
                                  dtype=torch.float64)
            weights = self.loss_weighting.weights(values)

            def weighting(gram):
                return weights
        self.last_combination = self.flat.combine(weighting)
        self.optimizer.step()

    def record(self):
        """The last step's method weights and pairwise cosines of the task gradients on the shared
        parameters, for metrics.jsonl: {"grad_weights": {task: w}, "grad_cosines": {"a/b": cos}}."""
        if self.last_combination is None or self.flat.num_tasks < 2:
            return {}
        names = self.flat.task_names
        cosines = gradient_cosines(self.flat.grads, self.flat.boundaries, self.last_combination)
        return {"grad_weights": dict(zip(names, self.last_combination.weights[0].tolist())),
                "grad_cosines": {f"{names[i]}/{names[j]}": cosines[i, j].item()
                                 for i in range(len(names)) for j in range(i + 1, len(names))}}

    def _method(self):
        return self.loss_weighting if self.loss_weighting is not None else self.weighting

    def state_dict(self):
        state = getattr(self._method(), "state_dict", None)
        return {"generator": self.generator.get_state(), "weighting": state() if state else {}}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        if hasattr(self._method(), "load_state_dict"):
            self._method().load_state_dict(state["weighting"])


def make_gradient_path(model, config) -> GradientPath:
    return GradientPath(model, config)
