"""Gradient-combination methods as weightings: each maps the K x K float64 Gram matrix G = g g^T
of the task gradients to K row weights w, and the update is sum_k w_k g_k (see ``combine.py``:
the Gram and the combination are the two C++ passes, a method adds no kernel).

The definitions follow TorchJD 0.18 (``torchjd.aggregation``), against which the tests check
every method on the [K, P] matrix; where TorchJD normalizes or scales, so do we, and the
docstrings say how. Everything is solved exactly or to machine precision on the K x K Gram (no
cvxpy, quadprog or scipy): small active-set and Newton solvers in float64.

Stateless methods are functions ``<name>_weights(gram, ...)``; stateful ones (GradVac's cosine
targets, Nash-MTL's last solution) are classes with ``state_dict`` / ``load_state_dict``.
"""
import math
from typing import Dict, List, Optional, Sequence

import torch

_EPS = torch.finfo(torch.float64).eps


def _zero_rows(gram: torch.Tensor) -> torch.Tensor:
    """[K] bool: the task gradients that are exactly zero (|g_k|^2 = 0)."""
    return gram.diagonal() <= 0


def nnls_gram(A: torch.Tensor, b: torch.Tensor, max_iterations: Optional[int] = None) -> torch.Tensor:
    """argmin_{x >= 0} 1/2 x^T A x - b^T x for A = M^T M positive semi-definite and b = M^T d in
    its range, i.e. the nonnegative least squares min ||M x - d|| given only its normal equations:
    Lawson & Hanson's active-set algorithm in the Gram form of Bro & De Jong (1997). Finite and
    exact (each passive-set subproblem is a least-squares solve, so a singular A is fine)."""
    K = b.shape[0]
    x = torch.zeros(K, dtype=torch.float64)
    passive = torch.zeros(K, dtype=torch.bool)
    scale = A.abs().max().item() + b.abs().max().item()
    max_iterations = max_iterations or 10 * K + 10
    for _ in range(max_iterations):
        gradient = b - A @ x  # the negative gradient; > 0 where raising x_j lowers the objective
        tolerance = 64 * K * _EPS * (A.abs().max().item() * x.abs().sum().item() + scale)
        candidates = (~passive) & (gradient > tolerance)
        if not candidates.any():
            return x
        passive[torch.where(candidates, gradient, -math.inf).argmax()] = True
        while True:
            index = passive.nonzero().flatten()
            z = torch.zeros(K, dtype=torch.float64)
            z[index] = torch.linalg.lstsq(A[index][:, index], b[index, None]).solution.flatten()
            blocking = passive & (z <= 0)
            if not blocking.any():
                x = z
                break
            # Step from x towards z until the first passive coordinate reaches 0.
            step = (x[blocking] / (x[blocking] - z[blocking])).min()
            x = x + step * (z - x)
            passive &= x > 0
            x[~passive] = 0.0
    raise RuntimeError(f"nnls_gram did not converge in {max_iterations} iterations (K = {K})")


def min_norm_simplex(gram: torch.Tensor) -> torch.Tensor:
    """The exact minimizer w of w^T G w over the simplex (w >= 0, sum w = 1): the min-norm point
    of the convex hull of the gradients. With x = s w, min_{x >= 0} x^T G x + (1 - 1^T x)^2 gives
    s = 1 / (1 + w^T G w) and a value increasing in w^T G w, so x / sum(x) is the min-norm point:
    one NNLS on A = G + 1 1^T, b = 1, with G scaled to unit trace (the point does not depend on
    the scale)."""
    gram = gram.to(torch.float64)
    K = gram.shape[0]
    trace = gram.diagonal().sum()
    scaled = gram / trace if trace > 0 else gram
    ones = torch.ones(K, dtype=torch.float64)
    x = nnls_gram(scaled + ones[:, None] * ones[None, :], ones)
    return x / x.sum()


# -- closed form / exactly solved --------------------------------------------------------------

def mean_weights(gram: torch.Tensor) -> torch.Tensor:
    """w = 1/K."""
    gram = gram.to(torch.float64)
    K = gram.shape[0]
    return torch.full((K,), 1.0 / K, dtype=torch.float64)


def imtl_g_weights(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning"), in TorchJD's
    generalization to dependent rows: v = pinv(G) sqrt(diag G), w = v / sum(v) (w = 0 when
    |sum v| < 1e-12). The update has equal projections onto every task's unit gradient."""
    gram = gram.to(torch.float64)
    v = torch.linalg.pinv(gram) @ gram.diagonal().clamp_min(0).sqrt()
    total = v.sum()
    return torch.zeros_like(v) if total.abs() < 1e-12 else v / total


ALIGNED_MTL_SCALES = ("min", "median", "rmse")


def aligned_mtl_weights(gram: torch.Tensor, scale_mode: str = "min") -> torch.Tensor:
    """Aligned-MTL (Senushkin et al. 2023, Algorithm 1) as TorchJD defines it: G = V diag(λ) V^T
    over the eigenvalues above λ_max K eps; B = sqrt(σ) V diag(λ)^(-1/2) V^T with σ the smallest
    ("min"), median or mean ("rmse") kept eigenvalue; w = B 1/K (the rows whitened into
    orthogonal, equal-norm components, then averaged). G = 0 gives w = 1/K."""
    gram = gram.to(torch.float64)
    if scale_mode not in ALIGNED_MTL_SCALES:
        raise ValueError(f"aligned-mtl: scale_mode must be one of {ALIGNED_MTL_SCALES}, got {scale_mode!r}")
    K = gram.shape[0]
    eigenvalues, vectors = torch.linalg.eigh(gram, UPLO="U")
    tolerance = eigenvalues.max() * K * _EPS
    rank = int((eigenvalues > tolerance).sum())
    if rank == 0:
        return mean_weights(gram)
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, vectors = eigenvalues[order][:rank], vectors[:, order][:, :rank]
    if scale_mode == "min":
        scale = eigenvalues[-1]
    elif scale_mode == "median":
        scale = torch.median(eigenvalues)
    else:
        scale = eigenvalues.mean()
    balance = scale.sqrt() * vectors @ torch.diag(eigenvalues.rsqrt()) @ vectors.T
    return balance @ mean_weights(gram)


def _normalized(gram: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """G / trace(G), or 0 when trace(G) < norm_eps: TorchJD's ``normalize`` (the Gram of the
    Jacobian scaled to unit Frobenius norm)."""
    trace = gram.diagonal().sum()
    return torch.zeros_like(gram) if trace < norm_eps else gram / trace


def dual_cone_weights(gram: torch.Tensor, u: torch.Tensor, norm_eps: float = 1e-4,
                      reg_eps: float = 1e-4) -> torch.Tensor:
    """The weights v of the projection of J^T u onto the dual cone {d : J d >= 0} of the rows:
    argmin_{v >= u} v^T A v (Quinton & Rey 2024, Proposition 1), with A = G / trace(G) + reg_eps I
    as TorchJD's quadprog projector regularizes it. With v = u + x: an NNLS in x >= 0 (A x = -A u
    on the free set), solved exactly."""
    gram = gram.to(torch.float64)
    K = gram.shape[0]
    A = _normalized(gram, norm_eps) + reg_eps * torch.eye(K, dtype=torch.float64)
    return u + nnls_gram(A, -(A @ u))


def upgrad_weights(gram: torch.Tensor, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> torch.Tensor:
    """UPGrad (Quinton & Rey 2024): each row g_i / K projected onto the dual cone of the rows,
    then summed; w = sum_i v_i with v_i = argmin_{v >= e_i / K} v^T A v (see
    :func:`dual_cone_weights` for A, TorchJD's normalization and regularization)."""
    gram = gram.to(torch.float64)
    K = gram.shape[0]
    return sum(dual_cone_weights(gram, row, norm_eps, reg_eps) for row in torch.eye(K, dtype=torch.float64) / K)


def dualproj_weights(gram: torch.Tensor, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> torch.Tensor:
    """DualProj (Quinton & Rey 2024, after GEM, Lopez-Paz & Ranzato 2017): the mean gradient
    projected onto the dual cone of the rows; w = argmin_{v >= 1/K} v^T A v."""
    gram = gram.to(torch.float64)
    return dual_cone_weights(gram, mean_weights(gram), norm_eps, reg_eps)


# -- iteratively solved -------------------------------------------------------------------------

def mgda_weights(gram: torch.Tensor) -> torch.Tensor:
    """MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of the convex hull of the task
    gradients, w = argmin_{w in simplex} w^T G w, solved exactly (:func:`min_norm_simplex`)
    instead of by Frank-Wolfe."""
    gram = gram.to(torch.float64)
    return min_norm_simplex(gram)


def cagrad_weights(gram: torch.Tensor, c: float = 0.4, norm_eps: float = 1e-4) -> torch.Tensor:
    """CAGrad (Liu et al. 2021, Algorithm 1), as TorchJD defines it: with G scaled to unit trace
    (0 when trace(G) < norm_eps), g0 the mean gradient and s = c |g0|,
    w* = argmin_{w in simplex} g_w . g0 + s |g_w|, and the update g0 + s g_w* / |g_w*|:
    weights 1/K + (s / |g_w*|) w* (0 when |g_w*| < norm_eps: Pareto-stationary). Unlike the
    official code there is no final division by 1 + c^2 (TorchJD's convention).

    Solved exactly: for a fixed n > 0 the problem with |g_w| replaced by (|g_w|^2 + n^2) / (2n)
    is the min-norm point of the shifted gradients g_i + g0 n / s; its optimum has |g_w| = n
    exactly at the solution, found by a bracketed root search on n, and finished in closed form
    once the support of w* is known."""
    gram = gram.to(torch.float64)
    if c < 0:
        raise ValueError(f"cagrad: c must be >= 0, got {c}")
    K = gram.shape[0]
    G = _normalized(gram, norm_eps)
    ones = torch.ones(K, dtype=torch.float64)
    g0_dots = G @ ones / K  # g_i . g0
    g0_norm = (ones @ G @ ones).clamp_min(0).sqrt() / K
    s = c * g0_norm
    if s <= 0:
        return mean_weights(gram) if g0_norm > 0 else torch.zeros(K, dtype=torch.float64)

    def solution(n):
        # g_i + g0 / kappa with kappa = s / n: Gram of the shifted rows.
        shift = n / s
        shifted = G + shift * (g0_dots[:, None] + g0_dots[None, :]) + shift ** 2 * g0_norm ** 2
        w = min_norm_simplex(shifted)
        return w, (w @ G @ w).clamp_min(0).sqrt()

    def excess(n):
        w, norm = solution(n)
        return (norm - n).item(), w, norm

    def on_support(w):
        """The exact solution if it has the support of ``w``, else None. On the support S the
        optimality conditions a_S + (s / n) G_SS w_S = mu 1, sum w_S = 1, n^2 = w^T G w give
        w_S = (mu u - v) / (mu 1.u - 1.v) with u = G_SS^-1 1, v = G_SS^-1 a_S, and
        mu^2 1.u - 2 mu 1.v + a_S.v = s^2; the conditions off S are then checked."""
        support = w > 0
        try:
            u, v = torch.linalg.solve(G[support][:, support],
                                      torch.stack([ones[support], g0_dots[support]], 1)).unbind(1)
        except RuntimeError:  # a singular G_SS: leave it to the root search
            return None
        alpha, beta, gamma = u.sum(), v.sum(), g0_dots[support] @ v
        discriminant = beta ** 2 - alpha * (gamma - s ** 2)
        if not (alpha > 0 and discriminant >= 0):
            return None
        mu = (beta + discriminant.sqrt()) / alpha
        if not mu * alpha - beta > 0:
            return None
        exact = torch.zeros(K, dtype=torch.float64)
        exact[support] = (mu * u - v) / (mu * alpha - beta)
        norm = (exact @ G @ exact).clamp_min(0).sqrt()
        if (exact < 0).any() or not norm > 0:
            return None
        slopes = g0_dots + (s / norm) * (G @ exact)  # the objective's gradient: >= mu, = mu on S
        if (slopes < exact @ slopes - 1e-12 * slopes.abs().max()).any():
            return None
        return exact, norm

    high = G.diagonal().clamp_min(0).sqrt().max().item()  # |g_w| <= max_i |g_i| on the simplex
    low = (lambda w: (w @ G @ w).clamp_min(0).sqrt().item())(min_norm_simplex(G))  # |g_w| >= min-norm
    f_low, w, norm = excess(low) if low > 0 else (math.inf, None, None)
    f_high, w_high, norm_high = excess(high)
    exact = on_support(w_high)
    if exact is not None:
        w, norm = exact
    elif f_high >= 0:  # all gradients equal in norm along the solution: n = max norm
        w, norm = w_high, norm_high
    elif f_low > 0:
        # Illinois regula falsi on excess(n) = |g_w(n)| - n, which is decreasing in n.
        side = 0
        for _ in range(200):
            if high - low <= 4 * _EPS * high:
                break
            n = (low * f_high - high * f_low) / (f_high - f_low) if math.isfinite(f_low) else 0.5 * (low + high)
            if not low < n < high:
                n = 0.5 * (low + high)
            f_n, w, norm = excess(n)
            exact = on_support(w)
            if exact is not None:
                w, norm = exact
                break
            if f_n == 0:
                break
            if f_n > 0:
                low, f_low = n, f_n
                if side == 1:
                    f_high /= 2
                side = 1
            else:
                high, f_high = n, f_n
                if side == -1:
                    f_low /= 2
                side = -1
    if norm < norm_eps:
        return torch.zeros(K, dtype=torch.float64)
    return mean_weights(gram) + (s / norm) * w


def _barrier_stationary_point(gram: torch.Tensor, power: float, start: Optional[torch.Tensor] = None,
                              method: str = "nash-mtl") -> Optional[torch.Tensor]:
    """The x > 0 with G x = x^(-power) (power > 0), the minimizer of the strictly convex
    1/2 x^T G x - sum_i h(x_i), h' = x^(-power) (log for power = 1): damped Newton from ``start``
    to a relative residual of 1e-13 K (or the best reached by rounding, at most 1e-9). Rows with
    G_ii = 0 must be removed first. None when the gradients cancel (0 in their convex hull)."""
    K = gram.shape[0]
    trace = gram.diagonal().sum()
    G = gram / trace  # x scales by trace^(-1 / (1 + power))
    hull_point = min_norm_simplex(G)
    if hull_point @ G @ hull_point <= 1e-14:
        # 0 in the convex hull (w >= 0, J^T w = 0): then w . G x = 0 < w . x^(-power), no solution.
        return None
    x = (G.diagonal().rsqrt() if start is None else start.clone()).clamp_min(1e-8)

    def objective(x):
        return (0.5 * x @ G @ x - (x.log().sum() if power == 1 else (x ** (1 - power)).sum() / (1 - power))).item()

    value = objective(x)
    best, best_residual = x, math.inf
    for _ in range(100):
        residual = G @ x - x ** (-power)
        scaled_residual = (residual.abs() * x).max().item()  # relative: x_i (G x)_i / x_i^(1 - power) - 1
        if scaled_residual < best_residual:
            best, best_residual = x, scaled_residual
        if scaled_residual <= 1e-13 * K:
            break
        step = torch.linalg.solve(G + torch.diag(power * x ** (-power - 1)), -residual)
        decrement = -(residual @ step).item()  # the squared Newton decrement
        t = 1.0
        while not (x + t * step > 0).all():
            t /= 2
        if decrement > 0.0625:
            # Far from the solution: backtrack until the objective decreases enough (Armijo). Near
            # it the decrease is below rounding, and full Newton steps converge quadratically.
            while objective(x + t * step) > value - 1e-4 * t * decrement and t > 1e-12:
                t /= 2
        x = x + t * step
        value = objective(x)
    if best_residual > 1e-9:
        raise RuntimeError(f"{method}: Newton stopped at a relative residual of {best_residual:.1e}")
    return best * trace ** (-1 / (1 + power))


def _on_nonzero_rows(gram: torch.Tensor, solve) -> torch.Tensor:
    """Applies ``solve`` to the Gram of the nonzero rows; zero rows get weight 0 (their weight
    does not change the update)."""
    K = gram.shape[0]
    keep = ~_zero_rows(gram)
    weights = torch.zeros(K, dtype=torch.float64)
    if keep.any():
        weights[keep] = solve(gram[keep][:, keep])
    return weights


def fairgrad_weights(gram: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """FairGrad (Ban & Ji 2024, Eq. 4): the w > 0 with G w = w^(-1/alpha) (alpha-fair utilities of
    the tasks' rates of improvement), solved by Newton to machine precision (TorchJD uses scipy's
    least_squares from w = 1/K). alpha = 0 gives 1/K. Zero rows get 0; if the gradients cancel
    (no solution) the weights are 0."""
    gram = gram.to(torch.float64)
    if alpha < 0:
        raise ValueError(f"fairgrad: alpha must be >= 0, got {alpha}")
    if alpha == 0:
        return mean_weights(gram)

    def solve(G):
        x = _barrier_stationary_point(G, 1.0 / alpha, method="fairgrad")
        return torch.zeros(G.shape[0], dtype=torch.float64) if x is None else x

    return _on_nonzero_rows(gram, solve)


def pcgrad_orders(num_tasks: int, generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """For each task i, the other tasks in the uniformly random order in which PCGrad projects g_i
    (Algorithm 1), drawn from ``generator`` (the global generator if None). GradVac draws the same
    way (one ``randperm(K - 1)`` per task, as TorchJD's GradVac does)."""
    orders = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        orders.append([others[j] for j in torch.randperm(len(others), generator=generator).tolist()])
    return orders


def checked_orders(num_tasks: int, orders: Optional[Sequence[Sequence[int]]],
                   generator: Optional[torch.Generator]) -> List[List[int]]:
    """``orders`` if given (checked: one per task), else drawn by :func:`pcgrad_orders`."""
    orders = pcgrad_orders(num_tasks, generator) if orders is None else [list(o) for o in orders]
    if len(orders) != num_tasks:
        raise ValueError(f"orders must hold one order per task ({num_tasks}), got {len(orders)}")
    return orders


# -- stateful -----------------------------------------------------------------------------------

class GramWeighting:
    """A method with state: ``weighting(gram) -> weights``, plus ``state_dict()`` /
    ``load_state_dict()`` for checkpoints."""

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


class GradVac(GramWeighting):
    """Gradient Vaccine (Wang et al. 2021) as TorchJD defines it, on the Gram matrix: for each task
    i, the other tasks j in a random order (the same draws as PCGrad's, or ``orders``); when the
    cosine phi_ij between the (already corrected) g_i and g_j is below its EMA target phi_hat_ij,
    g_i += |g_i| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2) + eps) g_j;
    then phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij. The update is the sum of the corrected
    rows. State: the [K, K] targets phi_hat (zero at the start)."""

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, generator: Optional[torch.Generator] = None):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
        if eps < 0:
            raise ValueError(f"gradvac: eps must be >= 0, got {eps}")
        self.beta, self.eps, self.generator = beta, eps, generator
        self.targets: Optional[torch.Tensor] = None

    def __call__(self, gram: torch.Tensor, orders: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
        gram = gram.to(torch.float64)
        K = gram.shape[0]
        if self.targets is None or self.targets.shape != (K, K):
            self.targets = torch.zeros(K, K, dtype=torch.float64)
        orders = checked_orders(K, orders, self.generator)
        G = gram.tolist()
        targets = self.targets.tolist()
        coeffs = [[1.0 if a == b else 0.0 for b in range(K)] for a in range(K)]
        for i in range(K):
            # c_i G: the dot products of the corrected g_i with every original g_j.
            dots = [sum(c * G[k][j] for k, c in enumerate(coeffs[i])) for j in range(K)]
            for j in orders[i]:
                norm_i = math.sqrt(max(sum(d * c for d, c in zip(dots, coeffs[i])), 0.0))
                norm_j = math.sqrt(max(G[j][j], 0.0))
                phi = dots[j] / (norm_i * norm_j + self.eps)
                target = targets[i][j]
                if phi < target:
                    sin_phi = math.sqrt(max(1.0 - phi * phi, 0.0))
                    sin_target = math.sqrt(max(1.0 - target * target, 0.0))
                    weight = norm_i * (target * sin_phi - phi * sin_target) / (norm_j * sin_target + self.eps)
                    coeffs[i][j] += weight
                    dots = [d + weight * G[j][k] for k, d in enumerate(dots)]
                targets[i][j] = (1.0 - self.beta) * target + self.beta * phi
        self.targets = torch.tensor(targets, dtype=torch.float64)
        return torch.tensor(coeffs, dtype=torch.float64).sum(0)

    def state_dict(self) -> Dict:
        return {"targets": None if self.targets is None else self.targets.clone()}

    def load_state_dict(self, state: Dict) -> None:
        self.targets = None if state["targets"] is None else state["targets"].clone()


class NashMTL(GramWeighting):
    """Nash-MTL (Navon et al. 2022): the bargaining solution alpha > 0 with alpha_i (G alpha)_i = 1
    (every task's utility log(g_i . d) balanced against the update's norm), solved by Newton to
    machine precision (the paper's code and TorchJD run a sequence of convex problems in cvxpy).
    As in both, the update's norm is clipped to ``max_norm`` (0: no clipping; note
    |J^T alpha|^2 = K at the solution). Zero rows get 0; if the gradients cancel (no solution),
    the weights are 0. State: the last solution (the Newton start of the next step)."""

    def __init__(self, max_norm: float = 1.0):
        if max_norm < 0:
            raise ValueError(f"nash-mtl: max_norm must be >= 0, got {max_norm}")
        self.max_norm = max_norm
        self.previous: Optional[torch.Tensor] = None

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        gram = gram.to(torch.float64)
        keep = ~_zero_rows(gram)

        def solve(G):
            trace = G.diagonal().sum()
            start = None
            if self.previous is not None and self.previous.shape == keep.shape:
                start = self.previous[keep] * trace.sqrt()  # the previous solution at unit trace
            x = _barrier_stationary_point(G, 1.0, start, method="nash-mtl")
            return torch.zeros(G.shape[0], dtype=torch.float64) if x is None else x

        alpha = _on_nonzero_rows(gram, solve)
        if alpha.any():
            self.previous = alpha.clone()
        norm = (alpha @ gram @ alpha).clamp_min(0).sqrt()
        if self.max_norm > 0 and norm > self.max_norm:
            alpha = alpha / norm * self.max_norm
        return alpha

    def state_dict(self) -> Dict:
        return {"previous": None if self.previous is None else self.previous.clone()}

    def load_state_dict(self, state: Dict) -> None:
        self.previous = None if state["previous"] is None else state["previous"].clone()
