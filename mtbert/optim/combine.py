"""Gradient combination for multitask training: plain sum, PCGrad (Yu et al. 2020), main +
auxiliary weighting (Bi et al. 2022) and the methods of ``methods.py`` (MGDA, CAGrad, IMTL-G,
Aligned-MTL, UPGrad, DualProj, Nash-MTL, FairGrad, GradVac), in two passes over the [K, P]
gradient buffer.

Every method here returns a linear combination of the task gradients g_1..g_K, so it is decided
entirely by the K x K Gram matrix G = g g^T:

1. ``gradient_gram`` (C++, one pass) computes G per segment of the columns (the shared encoder,
   then each task's head), accumulated in float64;
2. a *weighting* -- a small Python function from the K x K Gram matrix to K row weights ``w`` --
   applies the method's algebra (projections, conflicts, ...) to G alone;
3. ``gradient_combine`` (C++, one pass) writes ``out = sum_k w_k g_k``.

A new method is a new weighting function, no new kernel. ``combine_reference`` is the plain
per-pair implementation on the vectors themselves (as in the public Pytorch-PCGrad), kept for
tests and benchmarks.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from . import _ops, methods
from .methods import checked_orders, pcgrad_orders

Weighting = Callable[[torch.Tensor], torch.Tensor]
# Every method by name: its one-line description (the --grad-method help) and its options.
METHOD_HELP = {
    "sum": "plain sum of the task gradients",
    "pcgrad": "project away conflicting components (Yu et al. 2020)",
    "main-aux": "PCGrad of the main task against aux_weight * sum of the others (Bi et al. 2022)",
    "mgda": "min-norm point of the gradients' convex hull, exact (Sener & Koltun 2018)",
    "cagrad": "best worst-task improvement within c*|mean| of the mean (Liu et al. 2021)",
    "imtl-g": "equal projection onto every task's unit gradient (Liu et al. 2021)",
    "aligned-mtl": "whitened, equal-norm gradient components (Senushkin et al. 2023)",
    "upgrad": "each gradient projected onto the dual cone, summed (Quinton & Rey 2024)",
    "dualproj": "the mean projected onto the dual cone (Quinton & Rey 2024)",
    "nash-mtl": "Nash bargaining solution alpha*(G alpha) = 1 (Navon et al. 2022)",
    "fairgrad": "alpha-fair rates of improvement, G w = w^(-1/alpha) (Ban & Ji 2024)",
    "gradvac": "raise pairwise cosines to their EMA targets (Wang et al. 2021)",
}
METHODS = tuple(METHOD_HELP)
# The methods that :func:`combine_reference` implements on the vectors (the others are checked against TorchJD).
REFERENCE_METHODS = ("sum", "pcgrad", "main-aux")
METHOD_OPTIONS = {
    "cagrad": ("c", "norm_eps"), "aligned-mtl": ("scale_mode",), "upgrad": ("norm_eps", "reg_eps"),
    "dualproj": ("norm_eps", "reg_eps"), "nash-mtl": ("max_norm",), "fairgrad": ("alpha",),
    "gradvac": ("beta", "eps"),
}
REDUCTIONS = ("sum", "mean")


@dataclass
class GradientCombination:
    """What a combination did. ``gram``: [C, K, K] float64 Gram matrices per segment (None for
    "sum", which needs no Gram pass); ``weights``: [C, K] float64 row weights per segment."""

    gram: Optional[torch.Tensor]
    weights: torch.Tensor

    def cosine(self, segment: int = 0) -> torch.Tensor:
        """[K, K] cosine similarities of the task gradients on one segment (0: the shared one);
        zero rows give 0."""
        gram = self.gram[segment]
        norms = gram.diagonal().clamp_min(0).sqrt()
        return gram / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(torch.float64).tiny)


def gradient_cosines(grads: torch.Tensor, boundaries: Optional[Sequence[int]] = None,
                     combination: Optional[GradientCombination] = None,
                     reduce_gram: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """[K, K] cosine similarities of the task gradients on the first segment (the shared one), from
    ``combination``'s Gram when it has one, else from a Gram pass over ``grads`` (``reduce_gram``:
    as in :func:`combine_gradients`, when ``grads`` is one column shard of a larger buffer)."""
    if combination is None or combination.gram is None:
        gram = _ops.gradient_gram(grads, [0, grads.shape[1]] if boundaries is None else list(boundaries))
        combination = GradientCombination((gram if reduce_gram is None else reduce_gram(gram)).cpu(), torch.empty(0))
    return combination.cosine(0)


def sum_weights(gram: torch.Tensor) -> torch.Tensor:
    """Plain summation: w = 1."""
    return torch.ones(gram.shape[0], dtype=torch.float64)


def _project_conflicting(coeffs: List[List[float]], gram: List[List[float]], i: int, j: int) -> None:
    """g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j if g_i . g_j < 0 (Yu et al. 2020, Algorithm 1), on the
    coefficients of g_i over the original gradients. A zero g_j (|g_j|^2 = 0) conflicts with nothing."""
    dot = sum(c * gram_row[j] for c, gram_row in zip(coeffs[i], gram))
    if dot < 0.0 and gram[j][j] > 0.0:
        coeffs[i][j] -= dot / gram[j][j]


def pcgrad_weights(gram: torch.Tensor, orders: Optional[Sequence[Sequence[int]]] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """PCGrad on the Gram matrix: g_i^PC = sum_j C[i, j] g_j, starting from C = I and projecting in
    ``orders[i]`` (default: drawn by :func:`pcgrad_orders` from ``generator``); returns the weights
    of sum_i g_i^PC, i.e. the column sums of C."""
    K = gram.shape[0]
    orders = checked_orders(K, orders, generator)
    G = gram.tolist()
    coeffs = [[1.0 if a == b else 0.0 for b in range(K)] for a in range(K)]
    for i in range(K):
        for j in orders[i]:
            _project_conflicting(coeffs, G, i, j)
    return torch.tensor(coeffs, dtype=torch.float64).sum(0)


def main_aux_weights(gram: torch.Tensor, main: int = 0, aux_weight: float = 0.3, symmetric: bool = False) -> torch.Tensor:
    """Main + auxiliary weighting (Bi et al. 2022, MTRec): g_aux = aux_weight * sum_{j != main} g_j;
    if g_aux conflicts with g_main it is projected onto the normal plane of g_main; the update is
    g_main + g_aux^PC. ``symmetric=True`` also projects g_main onto the normal plane of g_aux
    (PCGrad between the two)."""
    K = gram.shape[0]
    if not 0 <= main < K:
        raise ValueError(f"main must be a task index in [0, {K}), got {main}")
    # The two virtual gradients as rows of coefficients over the K task gradients.
    virtual = torch.zeros(2, K, dtype=torch.float64)
    virtual[0, main] = 1.0
    virtual[1] = aux_weight
    virtual[1, main] = 0.0
    G2 = (virtual @ gram @ virtual.T).tolist()
    coeffs = [[1.0, 0.0], [0.0, 1.0]]
    _project_conflicting(coeffs, G2, 1, 0)
    if symmetric:
        # PCGrad projects each against the *original* other gradient.
        main_coeffs = [[1.0, 0.0], [0.0, 1.0]]
        _project_conflicting(main_coeffs, G2, 0, 1)
        coeffs[0] = main_coeffs[0]
    return torch.tensor(coeffs, dtype=torch.float64).sum(0) @ virtual


def make_weighting(method: Union[str, Weighting], *, generator: Optional[torch.Generator] = None,
                   orders: Optional[Sequence[Sequence[int]]] = None, main: int = 0, aux_weight: float = 0.3,
                   symmetric: bool = False, **options) -> Weighting:
    """The weighting (Gram [K, K] -> weights [K]) of ``method``: a name of :data:`METHODS` with its
    ``options`` (see :data:`METHOD_OPTIONS`, e.g. ``c=0.4`` for "cagrad"), or a callable, returned
    as is. Stateful methods ("gradvac", "nash-mtl") return an object whose state persists across
    calls: make it once and pass it to every step."""
    if callable(method):
        return method
    if method not in METHOD_HELP:
        raise ValueError(f"method must be one of {METHODS} or a callable gram -> weights, got {method!r}")
    unknown = sorted(set(options) - set(METHOD_OPTIONS.get(method, ())))
    if unknown:
        raise ValueError(f"{method} takes the options {METHOD_OPTIONS.get(method, ())}, got {unknown}")
    if method == "sum":
        return sum_weights
    if method == "pcgrad":
        return lambda gram: pcgrad_weights(gram, orders, generator)
    if method == "main-aux":
        return lambda gram: main_aux_weights(gram, main, aux_weight, symmetric)
    if method == "gradvac":
        gradvac = methods.GradVac(generator=generator, **options)
        return gradvac if orders is None else _with_orders(gradvac, orders)
    if method == "nash-mtl":
        return methods.NashMTL(**options)
    function = {"mgda": methods.mgda_weights, "cagrad": methods.cagrad_weights, "imtl-g": methods.imtl_g_weights,
                "aligned-mtl": methods.aligned_mtl_weights, "upgrad": methods.upgrad_weights,
                "dualproj": methods.dualproj_weights, "fairgrad": methods.fairgrad_weights}[method]
    return (lambda gram: function(gram, **options)) if options else function


def _with_orders(gradvac: "methods.GradVac", orders: Sequence[Sequence[int]]) -> Weighting:
    return lambda gram: gradvac(gram, orders)


def combine_gradients(grads: torch.Tensor, out: torch.Tensor, method: Union[str, Weighting] = "sum", *,
                      boundaries: Optional[Sequence[int]] = None, reduction: str = "sum",
                      generator: Optional[torch.Generator] = None, orders: Optional[Sequence[Sequence[int]]] = None,
                      main: int = 0, aux_weight: float = 0.3, symmetric: bool = False,
                      reduce_gram: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      **options) -> GradientCombination:
    """Combines the task gradients ``grads`` [K, P] (float32, contiguous) into ``out`` [P], in place.

    boundaries: None -- surgery on the whole vector (one segment, as Pytorch-PCGrad does); or
      [0, S, S + h_1, ..., P] -- surgery on the shared columns [0, S) only, and the columns of
      task k's head (segment k + 1) receive task k's own gradient.
    method: a name of :data:`METHODS` ("sum", "pcgrad", "mgda", "cagrad", ...), or a callable mapping
      a [K, K] float64 Gram matrix to [K] float64 row weights (e.g. a stateful ``GradVac()``).
    reduction: "sum" (the paper) or "mean" (the shared part divided by K).
    generator / orders: PCGrad's random projection order (``orders`` fixes it explicitly).
    main / aux_weight / symmetric: main + auxiliary weighting options (main is a task index).
    reduce_gram: maps the [C, K, K] Gram of these columns to the Gram of all columns, when
      ``grads`` is one column shard of a larger buffer (``mtbert.distributed`` passes an
      all-reduce): the weights then are those of the whole buffer, the combination that of the shard.
    options: the method's parameters (:data:`METHOD_OPTIONS`), e.g. ``c=0.5`` for "cagrad". A
      stateful method given by name starts from a fresh state at each call; pass
      ``make_weighting(name)`` once instead to keep it.

    If a Gram matrix is not finite (an overflowed gradient under a GradScaler), the rows are
    summed so that the non-finite values reach ``out`` and the scaler skips the step.
    """
    if grads.dim() != 2:
        raise ValueError(f"grads must be a [K, P] tensor, got shape {tuple(grads.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    K, P = grads.shape
    boundaries = [0, P] if boundaries is None else list(boundaries)
    if len(boundaries) not in (2, K + 2):
        raise ValueError(f"boundaries must be [0, P] or [0, S, ..., P] with one head segment per task "
                         f"({K + 2} entries), got {len(boundaries)} entries")
    weighting = make_weighting(method, generator=generator, orders=orders, main=main, aux_weight=aux_weight,
                               symmetric=symmetric, **options)
    C = len(boundaries) - 1
    gram = None if method == "sum" else _ops.gradient_gram(grads, boundaries)
    if gram is not None:
        gram = (gram if reduce_gram is None else reduce_gram(gram)).cpu()
    if gram is None or not torch.isfinite(gram[0]).all():
        shared = sum_weights(torch.empty(K, K))
    else:
        shared = weighting(gram[0]).to(torch.float64)
        if shared.shape != (K,):
            raise ValueError(f"the weighting must return {K} row weights, got shape {tuple(shared.shape)}")
    if reduction == "mean":
        shared = shared / K
    weights = torch.cat([shared[None], torch.eye(K, dtype=torch.float64)[: C - 1]])
    _ops.gradient_combine(grads, weights, boundaries, out)
    return GradientCombination(gram, weights)


def combine_reference(grads: torch.Tensor, method: str = "sum", *, boundaries: Optional[Sequence[int]] = None,
                      reduction: str = "sum", orders: Optional[Sequence[Sequence[int]]] = None, main: int = 0,
                      aux_weight: float = 0.3, symmetric: bool = False, dtype=torch.float64) -> torch.Tensor:
    """The plain implementation: per-pair projections on cloned vectors with ``torch.dot``
    (Algorithm 1 as written, and as the public Pytorch-PCGrad does it), in ``dtype``."""
    K, P = grads.shape
    boundaries = [0, P] if boundaries is None else list(boundaries)
    S = boundaries[1]
    rows = [g[:S].to(dtype).clone() for g in grads]
    if method == "sum":
        projected = rows
    elif method == "pcgrad":
        orders = pcgrad_orders(K) if orders is None else orders
        projected = []
        for i in range(K):
            g_i = rows[i].clone()
            for j in orders[i]:
                dot = torch.dot(g_i, rows[j])
                if dot < 0 and torch.dot(rows[j], rows[j]) > 0:
                    g_i -= dot / torch.dot(rows[j], rows[j]) * rows[j]
            projected.append(g_i)
    elif method == "main-aux":
        g_main = rows[main]
        g_aux = aux_weight * sum((rows[j] for j in range(K) if j != main), torch.zeros_like(g_main))  # K = 1: 0
        dot = torch.dot(g_main, g_aux)
        aux_pc = g_aux - dot / torch.dot(g_main, g_main) * g_main if dot < 0 and torch.dot(g_main, g_main) > 0 else g_aux
        main_pc = g_main
        if symmetric and dot < 0 and torch.dot(g_aux, g_aux) > 0:
            main_pc = g_main - dot / torch.dot(g_aux, g_aux) * g_aux
        projected = [main_pc, aux_pc]
    else:
        raise ValueError(f"method must be one of {REFERENCE_METHODS}, got {method!r}")
    shared = torch.stack(projected).sum(0)
    if reduction == "mean":
        shared = shared / K
    heads = [grads[k, boundaries[k + 1]:boundaries[k + 2]].to(dtype) for k in range(len(boundaries) - 2)]
    return torch.cat([shared, *heads])
