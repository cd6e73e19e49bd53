"""Loss-level weightings: methods that weight the task losses from the losses themselves, no Gram
matrix. With one gradient row per task, weighting loss k by lambda_k is weighting row k, so each
is used as ``flat.combine(lambda gram: weighting.weights(losses))`` (the rows are combined by the
same C++ pass as every other method).

Each object maps the step's [K] task losses (float, NaN for a task without a batch this step) to
[K] float64 weights, updates its own state from them, and has ``state_dict`` /
``load_state_dict``. Definitions follow LibMTL (Lin & Zhang 2023) and the FAMO paper's code; the
differences are stated per class.
"""
import math
from typing import Dict, Optional

import torch

LOSS_WEIGHTING_HELP = {
    "uncertainty": "homoscedastic-uncertainty weights exp(-s_k)/2, s_k learned (Kendall et al. 2018)",
    "dwa": "dynamic weight average: softmax of the loss descent rates, T = 2 (Liu et al. 2019)",
    "rlw": "random loss weighting: softmax of N(0, 1) draws each step (Lin et al. 2022)",
    "famo": "fast adaptive multitask optimization: balanced log-loss decrease (Liu et al. 2023)",
}
LOSS_WEIGHTINGS = tuple(LOSS_WEIGHTING_HELP)


def _present(losses: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(losses)


class UncertaintyWeighting:
    """Kendall et al. 2018 in LibMTL's form: total loss sum_k L_k / (2 exp(s_k)) + s_k / 2, so the
    weights are exp(-s_k) / 2 and dL/ds_k = 1/2 - L_k exp(-s_k) / 2; s (zero at the start) takes
    one Adam step of rate ``lr`` per training step (LibMTL trains s with the model's optimizer;
    a separate rate lets it move at fine-tuning learning rates)."""

    def __init__(self, num_tasks: int, lr: float = 1e-3):
        self.log_variances = torch.zeros(num_tasks, dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_variances], lr=lr)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.log_variances.detach().clone()
        present = _present(losses)
        self.log_variances.grad = torch.where(present, 0.5 - 0.5 * losses.nan_to_num() * torch.exp(-s), 0.0)
        self.optimizer.step()
        return 0.5 * torch.exp(-s)

    def state_dict(self) -> Dict:
        return {"log_variances": self.log_variances.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        with torch.no_grad():
            self.log_variances.copy_(state["log_variances"])
        self.optimizer.load_state_dict(state["optimizer"])


class DWA:
    """Dynamic Weight Average (Liu et al. 2019, MTAN): lambda_k = K softmax_k(r_k / T) with
    r_k = L_k(t-1) / L_k(t-2), the ratio of the mean losses of the last two completed periods, and
    lambda = 1 until two periods are complete. The paper's period is an epoch; here it is
    ``period`` steps (the trainer uses --log-every), so that short fine-tuning runs adapt."""

    def __init__(self, num_tasks: int, period: int, temperature: float = 2.0):
        if period < 1:
            raise ValueError(f"dwa: period must be >= 1 step, got {period}")
        self.period, self.temperature = period, temperature
        self.sums = torch.zeros(num_tasks, dtype=torch.float64)
        self.counts = torch.zeros(num_tasks, dtype=torch.float64)
        self.steps = 0
        self.history = []  # mean losses of the last two completed periods

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        K = losses.shape[0]
        if len(self.history) == 2:
            ratios = self.history[1] / self.history[0]
            weights = K * torch.softmax(ratios / self.temperature, 0)
        else:
            weights = torch.ones(K, dtype=torch.float64)
        present = _present(losses)
        self.sums += torch.where(present, losses.nan_to_num(), 0.0)
        self.counts += present.double()
        self.steps += 1
        if self.steps % self.period == 0:
            self.history = (self.history + [self.sums / self.counts.clamp_min(1)])[-2:]
            self.sums, self.counts = torch.zeros_like(self.sums), torch.zeros_like(self.counts)
        return weights

    def state_dict(self) -> Dict:
        return {"sums": self.sums.clone(), "counts": self.counts.clone(), "steps": self.steps,
                "history": [h.clone() for h in self.history]}

    def load_state_dict(self, state: Dict) -> None:
        self.sums, self.counts = state["sums"].clone(), state["counts"].clone()
        self.steps, self.history = state["steps"], [h.clone() for h in state["history"]]


class RLW:
    """Random Loss Weighting (Lin et al. 2022) as LibMTL does it: lambda = softmax(z), z ~ N(0, I)
    drawn each step from ``generator`` (its state is the method's state)."""

    def __init__(self, num_tasks: int, generator: Optional[torch.Generator] = None):
        self.num_tasks = num_tasks
        self.generator = generator or torch.Generator().manual_seed(0)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64), 0)

    def state_dict(self) -> Dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict) -> None:
        self.generator.set_state(state["generator"])


class FAMO:
    """FAMO (Liu et al. 2023, the authors' code): logits xi (zero at the start), z = softmax(xi);
    the loss sum_k z_k log(L_k + 1e-8) / c, c = sum_k z_k / (L_k + 1e-8), i.e. gradient weights
    z_k / (c (L_k + 1e-8)); then xi takes an Adam step (rate ``lr``, weight decay ``gamma``) along
    J_softmax^T delta, delta_k = log L_k(before) - log L_k(after). The authors measure L(after) by
    a second forward pass of the same batch after the update; here it is the next step's loss (no
    extra pass), as the paper's discussion of amortization allows."""

    def __init__(self, num_tasks: int, lr: float = 0.025, gamma: float = 1e-3):
        self.logits = torch.zeros(num_tasks, dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=gamma)
        self.previous: Optional[torch.Tensor] = None

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        present = _present(losses)
        if self.previous is not None:
            delta = torch.where(present & _present(self.previous),
                                (self.previous + 1e-8).log() - (losses.nan_to_num(1.0) + 1e-8).log(), 0.0)
            z = torch.softmax(self.logits, 0)
            self.logits.grad = torch.autograd.grad(z, self.logits, grad_outputs=delta)[0]
            self.optimizer.step()
        self.previous = losses.clone()
        z = torch.softmax(self.logits.detach(), 0)
        shifted = losses.nan_to_num(math.inf) + 1e-8  # an absent task: weight 0
        return z / shifted / (z / shifted).sum()

    def state_dict(self) -> Dict:
        return {"logits": self.logits.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "previous": None if self.previous is None else self.previous.clone()}

    def load_state_dict(self, state: Dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.previous = None if state["previous"] is None else state["previous"].clone()


def make_loss_weighting(name: str, num_tasks: int, *, period: int = 25, generator: Optional[torch.Generator] = None):
    """The loss weighting called ``name`` (:data:`LOSS_WEIGHTINGS`) for ``num_tasks`` tasks."""
    if name == "uncertainty":
        return UncertaintyWeighting(num_tasks)
    if name == "dwa":
        return DWA(num_tasks, period)
    if name == "rlw":
        return RLW(num_tasks, generator)
    if name == "famo":
        return FAMO(num_tasks)
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {name!r}")
