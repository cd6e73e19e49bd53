"""FusedAdamW: AdamW over a flat parameter buffer, one C++/CUDA kernel launch per parameter group.

Two formulas (``formula=``):

- ``"handout"`` (default), the CS224N project's AdamW: m <- b1 m + (1 - b1) g;
  v <- b2 v + (1 - b2) g^2; alpha_t = lr sqrt(1 - b2^t) / (1 - b1^t) if ``correct_bias`` (the
  efficient bias correction of Kingma & Ba, section 2) else lr; theta <- theta - alpha_t m / (sqrt(v) + eps);
  then decoupled decay on the updated theta: theta <- theta - lr * weight_decay * theta.
- ``"torch"``: exactly ``torch.optim.AdamW``'s update (decay first, eps added to the bias-corrected
  sqrt(v_hat)); ``correct_bias`` must be True. Note the defaults here are the handout's (eps=1e-6,
  weight_decay=0), pass torch's (eps=1e-8, weight_decay=1e-2) explicitly to match it.

``adamw_reference`` is the plain single-tensor implementation the tests compare against.
"""
import math
from collections import defaultdict
from typing import Callable, Iterable, List, Optional, Tuple

import torch

from . import _ops
from .flat import FlatParameters, owner_of

FORMULAS = ("handout", "torch")


def _check_hyperparameters(lr, betas, eps, weight_decay, formula, correct_bias):
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    if formula == "torch" and not correct_bias:
        raise ValueError("correct_bias=False exists only for formula='handout' (torch.optim.AdamW always corrects)")


class FusedAdamW(torch.optim.Optimizer):
    """AdamW whose ``step()`` is one kernel launch per parameter group over a flat buffer.

    ``params``: parameters or parameter groups, as for any torch optimizer (groups may differ in
    lr, betas, eps, weight_decay, correct_bias, formula). If they are packed in a
    :class:`FlatParameters` (e.g. the multitask one) its buffers are used; otherwise they are
    packed here into a new one (the parameters become views into it, their ``.grad`` views into its
    gradient buffer).

    Gradients live in the flat buffer: ``zero_grad()`` zeroes it in place (``set_to_none`` is
    ignored: autograd must keep accumulating into the views). A parameter whose ``.grad`` is None
    is skipped (no update, its step count does not advance); a ``.grad`` that is not the buffer's
    view (e.g. after ``model.zero_grad()`` set it to None and backward made a new one) is copied
    into the buffer and the view re-attached. ``state_dict()`` has torch.optim.AdamW's layout
    (per-parameter ``step``, ``exp_avg``, ``exp_avg_sq``); resuming from it is bit-exact.

    ``shard=(begin, end)`` (ZeRO-1 style, for data-parallel training): the optimizer holds state for
    the buffer columns [begin, end) only and updates only those (``exp_avg``/``exp_avg_sq`` are
    [end - begin]); every parameter's gradient must be present. ``gather_shards`` maps a local
    [end - begin] state tensor to the full [P] one (an all-gather), so that ``state_dict()`` holds
    the full state in the unsharded layout, which any shard (or an unsharded optimizer) loads.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, formula: str = "handout", shard: Optional[Tuple[int, int]] = None,
                 gather_shards: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        _check_hyperparameters(lr, betas, eps, weight_decay, formula, correct_bias)
        if (shard is None) != (gather_shards is None):
            raise ValueError("shard and gather_shards go together: give both (a sharded optimizer) or neither")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        formula=formula)
        self._flat: Optional[FlatParameters] = None
        self._plans: List[dict] = []
        super().__init__(params, defaults)
        self._flat = self._find_or_pack()
        P = self._flat.numel
        if shard is not None and not (0 <= shard[0] <= shard[1] <= P):
            raise ValueError(f"shard must be (begin, end) with 0 <= begin <= end <= {P} (the buffer length), "
                             f"got {shard!r}")
        self.shard = None if shard is None else (int(shard[0]), int(shard[1]))
        self._gather_shards = gather_shards
        begin, end = self.shard or (0, P)
        self.exp_avg = torch.zeros(end - begin, dtype=torch.float32, device=self._flat.params.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self._plans = [self._plan(group) for group in self.param_groups]

    @property
    def flat(self) -> FlatParameters:
        """The FlatParameters this optimizer updates."""
        return self._flat

    def _find_or_pack(self) -> FlatParameters:
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        owners = {id(owner_of(p)): owner_of(p) for p in params}
        if len(owners) == 1 and None not in owners.values():
            return next(iter(owners.values()))
        if any(o is not None for o in owners.values()):
            raise ValueError("params mix parameters of a FlatParameters with others (or of several): "
                             "give the optimizer the parameters of one FlatParameters, or none packed")
        unique = list({id(p): p for p in params}.values())
        return FlatParameters(unique)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], group["formula"],
                               group["correct_bias"])
        if self._flat is not None:
            self._plans.append(self._plan(group))

    def _plan(self, group: dict) -> dict:
        """The group's parameters in buffer order, with their spans, grad views and step counts."""
        spans = self._flat.spans()
        index = {id(p): i for i, p in enumerate(self._flat.parameters())}
        members = []
        for p in group["params"]:
            if id(p) in spans:
                members.append(p)
            elif p.requires_grad:
                raise ValueError(f"a parameter (shape {tuple(p.shape)}) added to the optimizer is not in its "
                                 f"flat buffer; build the optimizer over all parameters at once")
        members.sort(key=lambda p: spans[id(p)][0])
        plan = {
            "params": members,
            "views": [self._flat.grad_view(index[id(p)]) for p in members],
            "spans": torch.tensor([spans[id(p)] for p in members], dtype=torch.int64).reshape(-1, 2),
            "steps": torch.zeros(len(members), dtype=torch.float32),
        }
        if self.shard is not None:
            # The parts of the spans inside the shard, relative to its start (empty ones are dropped at step).
            begin, end = self.shard
            plan["shard_spans"] = plan["spans"].clamp(begin, end) - begin
        return plan

    def _state_views(self, plan: dict) -> None:
        """self.state[p] as views into the flat state (torch.optim.AdamW's keys)."""
        for i, (p, (begin, end)) in enumerate(zip(plan["params"], plan["spans"].tolist())):
            self.state[p] = {"step": plan["steps"][i], "exp_avg": self.exp_avg[begin:end].view_as(p),
                             "exp_avg_sq": self.exp_avg_sq[begin:end].view_as(p)}

    def _gradient_mask(self, plan: dict) -> Optional[torch.Tensor]:
        """Which parameters have a gradient (None: all); stray gradients are moved into the buffer."""
        missing = []
        for i, (p, view) in enumerate(zip(plan["params"], plan["views"])):
            g = p.grad
            if g is view:
                continue
            if g is None:
                missing.append(i)
                continue
            view.copy_(g)
            p.grad = view
        if not missing:
            return None
        mask = torch.ones(len(plan["params"]), dtype=torch.bool)
        mask[missing] = False
        return mask

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = self._flat
        if flat.selected_task is not None:
            raise RuntimeError(f"step() called while .grad points at task row {flat.selected_task} of the flat "
                               f"buffer: combine the task gradients (flat.combine()) outside flat.task() first")
        if not flat.is_intact():
            raise RuntimeError("the parameters are no longer views into the flat buffer (was the model moved "
                               "with .to()/.cuda()/.half() after packing?): pack after moving the model")
        if self.shard is not None:
            self._step_shard()
            return loss
        for group, plan in zip(self.param_groups, self._plans):
            if not plan["params"]:
                continue
            if plan["params"][0] not in self.state:
                self._state_views(plan)
            mask = self._gradient_mask(plan)
            steps = plan["steps"]
            if mask is None:
                steps += 1
                segments = torch.cat([plan["spans"], steps.to(torch.int64)[:, None]], dim=1)
            else:
                steps[mask] += 1
                segments = torch.cat([plan["spans"], steps.to(torch.int64)[:, None]], dim=1)[mask]
            beta1, beta2 = group["betas"]
            _ops.adamw_step(flat.params, self.exp_avg, self.exp_avg_sq, flat.grad, segments.contiguous(),
                            lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                            weight_decay=float(group["weight_decay"]), correct_bias=bool(group["correct_bias"]),
                            formula=group["formula"])
        return loss

    def _step_shard(self) -> None:
        """The update of the shard's columns: every parameter's step count advances (they all have a
        gradient in data-parallel training), the kernel runs over the shard's parts of the spans."""
        begin, end = self.shard
        flat = self._flat
        for group, plan in zip(self.param_groups, self._plans):
            if not plan["params"]:
                continue
            plan["steps"] += 1
            segments = torch.cat([plan["shard_spans"], plan["steps"].to(torch.int64)[:, None]], dim=1)
            segments = segments[segments[:, 1] > segments[:, 0]]
            if not len(segments):
                continue
            beta1, beta2 = group["betas"]
            _ops.adamw_step(flat.params[begin:end], self.exp_avg, self.exp_avg_sq, flat.grad[begin:end],
                            segments.contiguous(), lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                            eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                            correct_bias=bool(group["correct_bias"]), formula=group["formula"])

    def state_dict(self) -> dict:
        """torch.optim.AdamW's layout; a sharded optimizer gathers the full state first (a collective:
        every shard calls it)."""
        if self.shard is None:
            return super().state_dict()
        exp_avg, exp_avg_sq = self._gather_shards(self.exp_avg), self._gather_shards(self.exp_avg_sq)
        sharded_state, self.state = self.state, defaultdict(dict)
        try:
            for plan in self._plans:
                for i, (p, (begin, end)) in enumerate(zip(plan["params"], plan["spans"].tolist())):
                    if plan["steps"][i] > 0:
                        self.state[p] = {"step": plan["steps"][i].clone(), "exp_avg": exp_avg[begin:end].view_as(p),
                                         "exp_avg_sq": exp_avg_sq[begin:end].view_as(p)}
            return super().state_dict()
        finally:
            self.state = sharded_state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the flat gradient buffer in place (``set_to_none`` is ignored, see the class doc)."""
        self._flat.zero_grad()

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads torch.optim.AdamW-layout state and copies it into the flat state buffers (a sharded
        optimizer keeps its shard's columns)."""
        super().load_state_dict(state_dict)
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        if self.shard is not None:
            self._load_shard()
            return
        for plan in self._plans:
            loaded = [self.state.get(p) for p in plan["params"]]
            for i, (p, (begin, end), st) in enumerate(zip(plan["params"], plan["spans"].tolist(), loaded)):
                if st:
                    self.exp_avg[begin:end].copy_(st["exp_avg"].reshape(-1))
                    self.exp_avg_sq[begin:end].copy_(st["exp_avg_sq"].reshape(-1))
                    plan["steps"][i] = float(st["step"])
                else:
                    plan["steps"][i] = 0.0
            if any(loaded):
                self._state_views(plan)


    def _load_shard(self) -> None:
        shard_begin, shard_end = self.shard
        for plan in self._plans:
            for i, (p, (begin, end)) in enumerate(zip(plan["params"], plan["spans"].tolist())):
                loaded = self.state.get(p)
                plan["steps"][i] = float(loaded["step"]) if loaded else 0.0
                low, high = max(begin, shard_begin), min(end, shard_end)
                if loaded and low < high:
                    self.exp_avg[low - shard_begin:high - shard_begin].copy_(
                        loaded["exp_avg"].reshape(-1)[low - begin:high - begin])
                    self.exp_avg_sq[low - shard_begin:high - shard_begin].copy_(
                        loaded["exp_avg_sq"].reshape(-1)[low - begin:high - begin])
        self.state = defaultdict(dict)  # the full tensors just loaded: this optimizer keeps its shard only


@torch.no_grad()
def adamw_reference(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    step: int, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                    correct_bias: bool = True, formula: str = "handout") -> None:
    """One AdamW step on single tensors, in place, written as the formulas read (any dtype;
    the tests run it in float64). ``step`` is the step number after this update (1 for the first)."""
    beta1, beta2 = betas
    if formula == "torch":
        param.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_((1 - beta1) * grad)
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad * grad)
    if formula == "torch":
        v_hat = exp_avg_sq / (1 - beta2 ** step)
        param.sub_(lr / (1 - beta1 ** step) * exp_avg / (v_hat.sqrt() + eps))
    else:
        alpha = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step) if correct_bias else lr
        param.sub_(alpha * exp_avg / (exp_avg_sq.sqrt() + eps))
        param.sub_(lr * weight_decay * param)
