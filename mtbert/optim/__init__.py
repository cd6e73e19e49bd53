"""Flat parameter buffers, fused AdamW and multitask gradient combination (PCGrad, main+aux, sum).

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
        flat.combine("pcgrad", generator=generator)       # or "sum", "main-aux" (main="sts")
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
    symmetric=False, reduce_gram=None) -> GradientCombination(gram [C, K, K] | None, weights [C, K])``
    (``reduce_gram``: the shard's Gram -> the whole buffer's, e.g. an all-reduce; ``mtbert.distributed``).
Weightings (K x K step, Gram [K, K] float64 -> row weights [K] float64): ``sum_weights``,
    ``pcgrad_weights(gram, orders=None, generator=None)``, ``main_aux_weights(gram, main=0,
    aux_weight=0.3, symmetric=False)``; any such callable can be passed as ``method``.
References for tests/benchmarks: ``combine_reference(grads, method, ...)`` (per-pair loop on
    vectors), ``adamw_reference(param, grad, exp_avg, exp_avg_sq, step, ...)``, ``pcgrad_orders``.
"""
from .adamw import FORMULAS, FusedAdamW, adamw_reference
from .combine import (METHODS, GradientCombination, combine_gradients, combine_reference, main_aux_weights,
                      pcgrad_orders, pcgrad_weights, sum_weights)
from .flat import ALIGNMENT, FlatParameters, owner_of

__all__ = [
    "ALIGNMENT", "FORMULAS", "METHODS", "FlatParameters", "FusedAdamW", "GradientCombination", "adamw_reference",
    "combine_gradients", "combine_reference", "main_aux_weights", "owner_of", "pcgrad_orders",
    "pcgrad_weights", "sum_weights",
]
