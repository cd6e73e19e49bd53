"""The multitask training steps that ``bench_multitask_step.py`` times, and the numerics check that
must hold between them before anything is timed.

A step: one batch per task (SST, Quora, STS), a forward and a backward pass per task, PCGrad over
the task gradients, an AdamW update. Every step class has the same two-phase interface, so that
the check can compare the combined gradients before the update:

- ``gradients(batches, timer)``: forward + backward per task, then the combination; afterwards
  every ``p.grad`` holds the combined gradient;
- ``update(timer)``: the optimizer step;
- ``__call__(batches, timer)``: both.

The stacks:

- :class:`UsualStep` -- what people run today: per-task ``backward`` whose gradients are cloned and
  flattened, the per-pair Python PCGrad of the public Pytorch-PCGrad, ``torch.optim.AdamW`` with
  its defaults;
- :class:`CompetentStep` -- what a competent PyTorch user writes: each task's gradient copied into
  a row of a preallocated [K, P] matrix R, PCGrad on the Gram matrix (:func:`gram_pcgrad`:
  ``G = R Rᵀ``, the K×K projection weights, ``w @ R``), ``torch.optim.AdamW(fused=True)``;
- :class:`MtbertStep` -- mtbert's K-pass step (the trainer's ``--passes per-task``): backward
  straight into the task's row of the flat gradient buffer, the two-pass C++ PCGrad,
  ``FusedAdamW``;
- :class:`MtbertPackedStep` -- mtbert's one-pass step (the trainer's default ``--passes packed``):
  the three batches in one encoder forward and one backward, each task's gradient written into its
  row by the encoder's ops; the same PCGrad and ``FusedAdamW``.

This module imports only torch and mtbert, so that tests load it by its file path
(``importlib``) and check the check itself on a tiny model.
"""
import contextlib
import statistics
import time
from collections import defaultdict

import torch

from mtbert.kernels import GradientSegments
from mtbert.model import hugging_face_named
from mtbert.multitask.data import concat_inputs
from mtbert.optim import FlatParameters, FusedAdamW, combine_reference

TASKS = ("sst", "para", "sts")
LR, WEIGHT_DECAY, EPS = 1e-5, 0.01, 1e-8
# The combined gradients of two stacks must agree to this relative error (in norm), every step.
GRADIENT_RTOL = 1e-4
# The parameter change after the checked steps must agree to this relative error (in norm). Looser
# than the gradients': Adam divides by sqrt(v), so an element whose gradient is at rounding-noise
# level (a different summation order) moves by ±lr either way. MiniLM, 3 steps: 2.6e-4 measured.
UPDATE_RTOL = 1e-3


class PhaseTimer:
    """Wall time per phase of a step (synchronising a GPU at each boundary)."""

    def __init__(self):
        self.times = defaultdict(list)
        self.current = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.current[phase] += time.perf_counter() - start

    def end_step(self):
        for phase, seconds in self.current.items():
            self.times[phase].append(seconds)
        self.current.clear()

    def medians_ms(self):
        return {phase: round(statistics.median(t) * 1e3, 2) for phase, t in self.times.items()}


def pcgrad_gram_weights(gram, orders):
    """The row weights w of PCGrad's update sum_i g_i^PC = sum_j w_j g_j, from the K×K Gram matrix
    alone: g_i^PC = sum_j C[i, j] g_j starts from C = I, and each projection of g_i on a
    conflicting g_j (Yu et al. 2020, Algorithm 1) is C[i] -= (C[i] G[:, j] / G[j, j]) e_j."""
    gram = gram.double()
    coeffs = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    for i, order in enumerate(orders):
        for j in order:
            dot = coeffs[i] @ gram[:, j]
            if dot < 0 and gram[j, j] > 0:
                coeffs[i, j] -= dot / gram[j, j]
    return coeffs.sum(0)


def gram_pcgrad(task_grads, orders):
    """PCGrad of the task gradients ``task_grads`` [K, P] as a competent user writes it in plain
    torch: one Gram matrix G = R Rᵀ (a float32 matrix product), the K×K weights, one ``w @ R``."""
    weights = pcgrad_gram_weights(task_grads @ task_grads.T, orders)
    return weights.to(task_grads.dtype) @ task_grads


def float64_gram(grads, chunk=1 << 20):
    """G = J Jᵀ of the [K, P] matrix ``grads`` accumulated in float64, a chunk of columns at a time
    (no float64 copy of J): a reference Gram. A float32 matmul over 22M columns carries ~1e-4
    relative error, which ill-conditioned weightings amplify (Nash-MTL at K = 10; PCGrad when one
    task's gradient dwarfs another's)."""
    gram = torch.zeros(grads.shape[0], grads.shape[0], dtype=torch.float64, device=grads.device)
    for begin in range(0, grads.shape[1], chunk):
        block = grads[:, begin:begin + chunk].double()
        gram += block @ block.T
    return gram


def float64_gram_pcgrad(task_grads, orders):
    """:func:`gram_pcgrad` with the Gram matrix in float64 (:func:`float64_gram`): the competent
    stack as the numerics check's reference. With the float32 Gram, a random-init MiniLM (|g_sts|²
    ≈ 2·10⁴, |g_para|² ≈ 0.5) puts the reference itself 1.8e-4 (relative) off the exact combination;
    with it, mtbert's steps agree to 1.5e-7 (measured)."""
    return pcgrad_gram_weights(float64_gram(task_grads), orders).to(task_grads.dtype) @ task_grads


def sum_combination(task_grads, orders):
    """The plain sum of the task gradients (no surgery): a deliberately wrong stand-in for PCGrad."""
    return task_grads.sum(0)


def _autocast(model, dtype):
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def _task_loss(model, task, batch, autocast_dtype):
    with _autocast(model, autocast_dtype):
        scores = model(task, batch["inputs"])
    return model.loss(task, scores.float(), batch["labels"])


def _views(vector, params):
    """Views of ``vector`` shaped like ``params``, laid end to end."""
    views, offset = [], 0
    for p in params:
        views.append(vector[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


class _Step:
    """What the stacks share: the model, PCGrad's projection orders, the autocast dtype of the
    forward (None: fp32), an optimizer (set by the subclass), ``update`` and ``__call__``."""

    def __init__(self, model, orders, autocast_dtype=None):
        self.model, self.orders, self.autocast_dtype = model, orders, autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]

    def gradients(self, batches, timer):
        raise NotImplementedError

    def _backward(self, task, batches, timer):
        """Forward and backward of ``task``'s batch; the gradient lands wherever ``.grad`` points."""
        with timer("forward"):
            loss = _task_loss(self.model, task, batches[task], self.autocast_dtype)
        with timer("backward"):
            loss.backward()

    def update(self, timer):
        with timer("optimizer"):
            self.optimizer.step()

    def __call__(self, batches, timer):
        self.gradients(batches, timer)
        self.update(timer)


class UsualStep(_Step):
    """The usual stack: clone + flatten per task, per-pair Python PCGrad, torch AdamW (defaults)."""

    def __init__(self, model, orders, autocast_dtype=None):
        super().__init__(model, orders, autocast_dtype)
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)

    def gradients(self, batches, timer):
        task_grads = []
        for task in TASKS:
            self.optimizer.zero_grad(set_to_none=False)
            self._backward(task, batches, timer)
            with timer("combine"):
                task_grads.append(torch.cat([p.grad.flatten() for p in self.params]))
        with timer("combine"):
            combined = combine_reference(torch.stack(task_grads), "pcgrad", orders=self.orders, dtype=torch.float32)
            for p, view in zip(self.params, _views(combined, self.params)):
                p.grad.copy_(view)


class CompetentStep(_Step):
    """The competent stack: each task's gradient copied into its row of R [K, P], PCGrad on the
    Gram matrix in plain torch, ``torch.optim.AdamW(fused=True)``. ``combination`` (default
    :func:`gram_pcgrad`) maps (R, orders) to the combined gradient [P]."""

    def __init__(self, model, orders, autocast_dtype=None, combination=gram_pcgrad):
        super().__init__(model, orders, autocast_dtype)
        self.combination = combination
        numel = sum(p.numel() for p in self.params)
        self.task_grads = torch.zeros(len(TASKS), numel, device=self.params[0].device)
        self.row_views = [_views(row, self.params) for row in self.task_grads]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)

    def gradients(self, batches, timer):
        for views, task in zip(self.row_views, TASKS):
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(task, batches, timer)
            with timer("combine"):
                for p, view in zip(self.params, views):
                    if p.grad is None:  # another task's head: no gradient from this task
                        view.zero_()
                    else:
                        view.copy_(p.grad)
        with timer("combine"):
            combined = self.combination(self.task_grads, self.orders)
            for p, view in zip(self.params, _views(combined, self.params)):
                p.grad = view


class MtbertStep(_Step):
    """mtbert's K-pass step: backward into flat gradient rows, C++ PCGrad, FusedAdamW. With
    ``autocast_dtype`` the forward runs under autocast as the trainer's does (fp32 master
    weights, optimizer and Gram)."""

    def __init__(self, model, orders, autocast_dtype=None):
        super().__init__(model, orders, autocast_dtype)
        self.flat = FlatParameters(shared=model.encoder.parameters(),
                                   tasks={task: model.heads[task].parameters() for task in TASKS})
        self.optimizer = FusedAdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY, formula="torch")

    def gradients(self, batches, timer):
        self.optimizer.zero_grad()
        for task in TASKS:
            with self.flat.task(task):
                self._backward(task, batches, timer)
        with timer("combine"):
            self.flat.combine("pcgrad", scope="all", orders=self.orders)


class MtbertPackedStep(MtbertStep):
    """mtbert's one-pass step, as the trainer's ``_packed_pass``: the tasks' batches concatenated
    (``concat_inputs``) into one forward, whose ops route each task's shared-parameter gradients
    to its row (``GradientSegments``), and one backward of the summed losses."""

    def gradients(self, batches, timer):
        self.optimizer.zero_grad()
        with timer("forward"):
            inputs, offsets = concat_inputs([batches[task]["inputs"] for task in TASKS],
                                            self.model.encoder.config.pad_token_id)
            segments = GradientSegments(inputs["attention_mask"], offsets, self.flat.shared_row_views())
            with segments, _autocast(self.model, self.autocast_dtype):
                scores = self.model.forward_packed(list(TASKS), inputs, offsets)
            loss = sum(self.model.loss(task, task_scores.float(), batches[task]["labels"])
                       for task, task_scores in zip(TASKS, scores))
        with timer("backward"), self.flat.own_rows():
            loss.backward()
        with timer("combine"):
            self.flat.combine("pcgrad", scope="all", orders=self.orders)


def relative_error(value, reference):
    """||value - reference|| / ||reference|| (float64)."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float64).tiny))


def _by_name(model, what):
    """{name: parameter or its gradient} of the trainable parameters (a missing gradient is zero),
    under Hugging Face's names (mtbert's fused QKV parameter as its query, key and value parts)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = p.grad if what == "grad" else p
            out.update(hugging_face_named(name, (torch.zeros_like(p) if value is None else value).detach()))
    return out


def _aligned_vectors(reference_model, candidate_model, what):
    """Both models' parameters (or gradients) concatenated in the reference's order, by name."""
    ref, cand = _by_name(reference_model, what), _by_name(candidate_model, what)
    if ref.keys() != cand.keys():
        only_ref, only_cand = sorted(ref.keys() - cand.keys())[:5], sorted(cand.keys() - ref.keys())[:5]
        raise ValueError(f"the two models' trainable parameters differ by name: only in the reference {only_ref}, "
                         f"only in the candidate {only_cand}")
    return (torch.cat([ref[name].flatten().cpu() for name in ref]),
            torch.cat([cand[name].flatten().cpu() for name in ref]))


def _copy_parameters(source_model, target_model):
    target = _by_name(target_model, "param")  # detached views: copied into in place
    with torch.no_grad():
        for name, p in _by_name(source_model, "param").items():
            target[name].copy_(p)  # in place: mtbert's parameters stay views of its flat buffer


def check_same_training(reference, candidate, step_batches, gradient_rtol=GRADIENT_RTOL, update_rtol=UPDATE_RTOL):
    """Trains both steps from the same weights on the same batches (one dict of task batches per
    step) and raises AssertionError when, at any step, the combined gradients differ by more than
    ``gradient_rtol`` (relative, in norm), or when the parameter changes after the last step differ
    by more than ``update_rtol``. Parameters are matched by name.

    Before each step the candidate's parameters are set to the reference's, so that every step
    compares the combined gradients at the same point: PCGrad's projections switch on the sign of
    dot products, some of which are within rounding of zero (task gradients nearly orthogonal),
    and Adam's first steps move every parameter by about ±lr whatever the size of its gradient,
    so two independent trajectories part by more than rounding after one step. The optimizers
    keep their own state, which the last step's update checks. Returns the errors measured:
    ``{"gradients": [one per step], "update": float}``."""
    start_ref, start_cand = _aligned_vectors(reference.model, candidate.model, "param")
    if not torch.equal(start_ref, start_cand):
        raise ValueError("the two steps must start from the same weights")
    timer = PhaseTimer()
    errors = {"gradients": []}
    for index, batches in enumerate(step_batches):
        _copy_parameters(reference.model, candidate.model)
        reference.gradients(batches, timer)
        candidate.gradients(batches, timer)
        grad_ref, grad_cand = _aligned_vectors(reference.model, candidate.model, "grad")
        errors["gradients"].append(relative_error(grad_cand, grad_ref))
        if not errors["gradients"][-1] <= gradient_rtol:
            raise AssertionError(f"step {index + 1}: the combined gradients differ by {errors['gradients'][-1]:.2e} "
                                 f"(relative, in norm; allowed {gradient_rtol:.0e})")
        reference.update(timer)
        candidate.update(timer)
    end_ref, end_cand = _aligned_vectors(reference.model, candidate.model, "param")
    errors["update"] = relative_error(end_cand - start_cand, end_ref - start_ref)
    if not errors["update"] <= update_rtol:
        raise AssertionError(f"after {len(step_batches)} steps the parameter changes differ by {errors['update']:.2e} "
                             f"(relative, in norm; allowed {update_rtol:.0e})")
    return errors
