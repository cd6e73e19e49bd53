"""Flat parameter buffers, fused AdamW and multitask gradient combination (sum, PCGrad, main+aux,
MGDA, CAGrad, IMTL-G, Aligned-MTL, UPGrad, DualProj, Nash-MTL, FairGrad, GradVac).

Thin wrappers over the extension ops ``torch.ops.mtbert.gradient_gram / gradient_combine /
adamw_step`` (C++ on CPU, CUDA on GPUs). Nothing here knows about BERT or tasks beyond "K rows of
gradients"; anyone can reuse it for another model.

A multitask training step (K tasks)::

    flat = FlatParameters(shared=model.bert.parameters(),
                          tasks={"sst": model.sst.parameters(), "para": model.para.parameters(),
                                 "sts": model.sts.parameters()})
    optimizer = FusedAdamW(model.parameters(), lr=1e-5, weight_decay=0.01)   # finds flat's buffer
    generator = torch.Generator().manual_seed(seed)       # PCGrad's projection order, reproducible

    for batches in loader:
        for name, batch in batches.items():
            with flat.task(name):                          # .grad -> row `name` of flat.grads
                scaler.scale(loss_of(name, batch)).backward()
        flat.combine("pcgrad", generator=generator)       # or "sum", "main-aux" (main="sts"), "upgrad", ...
        scaler.step(optimizer)                             # (or optimizer.step() without a scaler)
        scaler.update()
        optimizer.zero_grad()                              # zeroes all rows in place

Plain training: ``FusedAdamW(model.parameters(), ...)`` packs the parameters itself (K = 1) and is
used like any optimizer (``loss.backward(); opt.step(); opt.zero_grad()``).

API
---
``FlatParameters(shared: Iterable[Parameter], tasks: Mapping[str, Iterable[Parameter]] | None = None)``
    ``.params`` [P], ``.grads`` [K, P], ``.grad`` [P] (combined; = grads[0] when K = 1),
    ``.boundaries`` [0, S, ..., P], ``.task_names``, ``.num_tasks``, ``.numel``, ``.parameters()``,
    ``.span(p)``, ``.task(name_or_index)`` (context manager), ``.select_task(t)``,
    ``.select_combined()``, ``.selected_task``, ``.zero_grad()``, ``.is_intact()``,
    ``.combine(method="sum", *, scope="shared"|"all", reduction="sum"|"mean", generator=None,
    orders=None, main=None, aux_weight=0.3, symmetric=False) -> GradientCombination``.
``FusedAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
    formula="handout"|"torch", shard=None, gather_shards=None)``: a torch.optim.Optimizer; ``.flat``;
    state_dict in torch.optim.AdamW's layout; ``shard=(begin, end)`` holds state for and updates
    those buffer columns only (ZeRO-1; ``gather_shards`` rebuilds the full state for state_dict).
``combine_gradients(grads[K, P], out[P], method="sum"|"pcgrad"|"main-aux"|callable, *,
    boundaries=None, reduction="sum", generator=None, orders=None, main=0, aux_weight=0.3,
    symmetric=False, reduce_gram=None, **options) -> GradientCombination(gram [C, K, K] | None,
    weights [C, K])`` (``reduce_gram``: the shard's Gram -> the whole buffer's, e.g. an all-reduce;
    ``mtbert.distributed``; ``options``: the method's parameters).
``make_weighting(method, *, generator, orders, main, aux_weight, symmetric, **options)``: the
    weighting of a method name (``METHODS``, one line each in ``METHOD_HELP``, parameters in
    ``METHOD_OPTIONS``); stateful ones (``GradVac``, ``NashMTL``) keep their state across calls and
    have ``state_dict()`` / ``load_state_dict()``.
Weightings (K x K step, Gram [K, K] float64 -> row weights [K] float64): ``sum_weights``,
    ``pcgrad_weights(gram, orders=None, generator=None)``, ``main_aux_weights(gram, main=0,
    aux_weight=0.3, symmetric=False)``, and in ``methods``: ``mgda_weights``, ``cagrad_weights(gram,
    c=0.4)``, ``imtl_g_weights``, ``aligned_mtl_weights(gram, scale_mode="min")``,
    ``upgrad_weights``, ``dualproj_weights``, ``fairgrad_weights(gram, alpha=1.0)``; any such callable
    can be passed as ``method``.
References for tests/benchmarks: ``combine_reference(grads, method, ...)`` (per-pair loop on
    vectors), ``adamw_reference(param, grad, exp_avg, exp_avg_sq, step, ...)``, ``pcgrad_orders``.
"""
from .adamw import FORMULAS, FusedAdamW, adamw_reference
from .combine import (METHOD_HELP, METHOD_OPTIONS, METHODS, GradientCombination, combine_gradients,
                      combine_reference, main_aux_weights, make_weighting, pcgrad_orders, pcgrad_weights, sum_weights)
from .methods import (GradVac, NashMTL, aligned_mtl_weights, cagrad_weights, dualproj_weights, fairgrad_weights,
                      imtl_g_weights, mgda_weights, upgrad_weights)
from .flat import ALIGNMENT, FlatParameters, owner_of

__all__ = [
    "ALIGNMENT", "FORMULAS", "METHOD_HELP", "METHOD_OPTIONS", "METHODS", "FlatParameters", "FusedAdamW",
    "GradVac", "GradientCombination", "NashMTL", "adamw_reference", "aligned_mtl_weights", "cagrad_weights",
    "combine_gradients", "combine_reference", "dualproj_weights", "fairgrad_weights", "imtl_g_weights",
    "main_aux_weights", "make_weighting", "mgda_weights", "owner_of", "pcgrad_orders", "pcgrad_weights",
    "sum_weights", "upgrad_weights",
]
