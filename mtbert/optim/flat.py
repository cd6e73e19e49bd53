"""Flat parameter and gradient buffers: every trainable parameter becomes a view into one
contiguous float32 buffer, and every ``.grad`` a view into a [K, P] gradient buffer (one row per
task), so that autograd accumulates each task's backward pass straight into its row, gradient
surgery reads the rows without copies, and one kernel updates all parameters."""
import bisect
import contextlib
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .combine import GradientCombination, Weighting, combine_gradients

# Parameter -> the FlatParameters holding it (so that FusedAdamW finds the buffer of its parameters).
_OWNER = WeakIdKeyDictionary()

# Every parameter starts on a multiple of 16 elements (64 bytes): a cache line, and aligned for the
# CUDA kernels' 16-byte vector loads.
ALIGNMENT = 16

TaskKey = Union[int, str]


def owner_of(param: torch.Tensor) -> Optional["FlatParameters"]:
    """The FlatParameters whose buffer ``param`` is a view of, or None."""
    return _OWNER.get(param)


class FlatParameters:
    """Packs parameters into one float32 buffer: the shared ones first, then each task's.

    >>> flat = FlatParameters(shared=model.bert.parameters(),
    ...                       tasks={"sst": model.sst_head.parameters(), "para": ..., "sts": ...})
    >>> with flat.task("sst"):          # .grad of every parameter -> row "sst" of flat.grads
    ...     loss_sst.backward()
    >>> flat.combine("pcgrad")          # rows -> flat.grad (the combined gradient), .grad -> views of it

    Attributes:
        params: [P] float32, every packed parameter is a view into it (``p.data``).
        grads: [K, P] float32, one row per task (K = 1 without tasks).
        grad: [P] float32, the combined gradient the optimizer reads (row 0 itself when K = 1).
        boundaries: [0, S, S + h_1, ..., P]: the shared segment, then each task's segment
            (just [0, P] without tasks).
        task_names: the task names in row order.

    Gradients present when packing are copied into ``grad``. Outside ``task()``, each ``.grad`` is
    a view into ``grad``; so ``clip_grad_norm_``,
    ``GradScaler.unscale_`` and the optimizer see the combined gradient. Padding between parameters
    (for alignment) is zero in every buffer. Pack after moving the model to its device: ``.to()``,
    ``.cuda()`` or ``.half()`` replace the parameters' storage and detach them from the buffer
    (``is_intact()`` says whether they still are views). ``numel_multiple`` pads the buffers'
    length P (the last segment) to a multiple of it: equal column shards for data-parallel
    training (``mtbert.distributed``). ``model.load_state_dict`` copies into the
    views and keeps them. ``model.state_dict()`` tensors are views too: ``torch.save`` stores the
    buffer once; safetensors needs ``{k: v.clone()}``.
    """

    def __init__(self, shared: Iterable[torch.nn.Parameter],
                 tasks: Optional[Mapping[str, Iterable[torch.nn.Parameter]]] = None, numel_multiple: int = 1):
        if tasks is not None and not isinstance(tasks, Mapping):
            raise TypeError(f"tasks must be a mapping from task name to parameters, got {type(tasks).__name__}")
        if not (isinstance(numel_multiple, int) and numel_multiple >= 1):
            raise ValueError(f"numel_multiple must be an integer >= 1, got {numel_multiple!r}")
        self.task_names: List[str] = list(tasks or {})
        groups = [("shared", list(shared))] + [(f"tasks[{name!r}]", list(tasks[name])) for name in self.task_names]
        self._parameters: List[torch.nn.Parameter] = []
        self._spans: List[Tuple[int, int]] = []
        self.boundaries: List[int] = [0]
        seen = set()
        offset, device = 0, None
        for label, params in groups:
            for index, p in enumerate(params):
                where = f"{label}[{index}] (shape {tuple(p.shape)})"
                if not isinstance(p, torch.Tensor) or not p.requires_grad:
                    raise ValueError(f"{where} must be a trainable parameter (requires_grad=True)")
                if p.dtype != torch.float32:
                    raise ValueError(f"{where} must be float32 (the master copy; use torch.autocast for "
                                     f"lower precision), got {p.dtype}")
                if id(p) in seen:
                    raise ValueError(f"{where} appears twice: a parameter belongs to one segment only")
                if owner_of(p) is not None:
                    raise ValueError(f"{where} is already packed in another FlatParameters")
                device = p.device if device is None else device
                if p.device != device:
                    raise ValueError(f"{where} is on {p.device}, the others on {device}: pack one device at a time")
                seen.add(id(p))
                self._parameters.append(p)
                self._spans.append((offset, offset + p.numel()))
                offset += -(-p.numel() // ALIGNMENT) * ALIGNMENT
            self.boundaries.append(offset)
        self.boundaries[-1] = offset = -(-offset // numel_multiple) * numel_multiple
        device = device or torch.device("cpu")
        P, K = offset, max(1, len(self.task_names))
        self.params = torch.zeros(P, dtype=torch.float32, device=device)
        self.grads = torch.zeros(K, P, dtype=torch.float32, device=device)
        self.grad = self.grads[0] if K == 1 else torch.zeros(P, dtype=torch.float32, device=device)
        with torch.no_grad():
            for p, (begin, end) in zip(self._parameters, self._spans):
                self.params[begin:end].copy_(p.reshape(-1))
                if p.grad is not None:  # a gradient already there is kept, as the combined one
                    self.grad[begin:end].copy_(p.grad.reshape(-1))
                p.data = self.params[begin:end].view_as(p)
                _OWNER[p] = self
        self._row_views = [self._views_of(self.grads[k]) for k in range(K)]
        # The task row of each parameter's segment (None: shared).
        self._owner_rows = [None if begin < self.boundaries[1] else bisect.bisect_right(self.boundaries, begin) - 2
                            for begin, _ in self._spans]
        self._grad_views = self._views_of(self.grad)
        self._selected: Optional[int] = None
        self.select_combined()

    def _views_of(self, buffer: torch.Tensor) -> List[torch.Tensor]:
        return [buffer[begin:end].view_as(p) for p, (begin, end) in zip(self._parameters, self._spans)]

    @property
    def num_tasks(self) -> int:
        """K, the number of gradient rows."""
        return self.grads.shape[0]

    @property
    def numel(self) -> int:
        """P, the buffer length (parameters plus alignment padding)."""
        return self.params.numel()

    def parameters(self) -> List[torch.nn.Parameter]:
        """The packed parameters in buffer order."""
        return list(self._parameters)

    def span(self, param: torch.Tensor) -> Tuple[int, int]:
        """(begin, end) of ``param`` in the buffer."""
        for p, span in zip(self._parameters, self._spans):
            if p is param:
                return span
        raise ValueError(f"param (shape {tuple(param.shape)}) is not packed in this FlatParameters")

    def spans(self) -> Dict[int, Tuple[int, int]]:
        """id(parameter) -> (begin, end) for every packed parameter."""
        return {id(p): span for p, span in zip(self._parameters, self._spans)}

    def grad_view(self, index: int) -> torch.Tensor:
        """The view of ``grad`` that parameter number ``index`` (buffer order) has as ``.grad``."""
        return self._grad_views[index]

    def is_intact(self) -> bool:
        """Whether every packed parameter is still a view into ``params``."""
        base = self.params.data_ptr()
        return all(p.data_ptr() == base + 4 * begin for p, (begin, _) in zip(self._parameters, self._spans))

    def task_index(self, task: TaskKey) -> int:
        """The row of ``task`` (a name or an index)."""
        if isinstance(task, str):
            if task not in self.task_names:
                raise KeyError(f"task must be one of {self.task_names}, got {task!r}")
            return self.task_names.index(task)
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task index must be in [0, {self.num_tasks}), got {task}")
        return int(task)

    def select_task(self, task: TaskKey) -> None:
        """Points every ``.grad`` at row ``task`` of ``grads``: the next backward accumulates there."""
        k = self.task_index(task)
        for p, view in zip(self._parameters, self._row_views[k]):
            p.grad = view
        self._selected = k

    def select_combined(self) -> None:
        """Points every ``.grad`` at ``grad``, the combined gradient."""
        for p, view in zip(self._parameters, self._grad_views):
            p.grad = view
        self._selected = None

    @property
    def selected_task(self) -> Optional[Union[int, str]]:
        """The row ``.grad`` points at, ``"own"`` inside :meth:`own_rows`, or None when it points
        at the combined gradient."""
        return self._selected

    def shared_row_views(self) -> Dict[int, List[torch.Tensor]]:
        """id(parameter) -> its view in each of the K rows, for every shared parameter: where
        ops that split gradients by task (``mtbert.kernels.GradientSegments``) write them."""
        return {id(p): [views[i] for views in self._row_views]
                for i, (p, owner) in enumerate(zip(self._parameters, self._owner_rows)) if owner is None}

    def _select_own_rows(self) -> None:
        for i, (p, owner) in enumerate(zip(self._parameters, self._owner_rows)):
            p.grad = None if owner is None else self._row_views[owner][i]
        self._selected = "own"

    @contextlib.contextmanager
    def own_rows(self) -> Iterator[None]:
        """``with flat.own_rows(): sum_of_task_losses.backward()``: each task's parameters
        accumulate into their own row; the shared parameters have no ``.grad``, their per-task
        gradients being written into the rows by the ops themselves (see ``shared_row_views``).
        Raises RuntimeError if autograd gave a shared parameter a gradient: it would mix the tasks."""
        if not self.task_names:
            raise RuntimeError("own_rows() needs task segments; this FlatParameters has none")
        self._select_own_rows()
        try:
            yield
            mixed = [tuple(p.shape) for p, owner in zip(self._parameters, self._owner_rows)
                     if owner is None and p.grad is not None]
            if mixed:
                raise RuntimeError(f"shared parameters of shapes {mixed} received a gradient of all tasks at once: "
                                   "their ops did not split it by task")
        finally:
            self.select_combined()

    @contextlib.contextmanager
    def task(self, task: TaskKey) -> Iterator[int]:
        """``with flat.task("sst"): loss.backward()``: accumulates into row "sst"; yields the row."""
        self.select_task(task)
        try:
            yield self._selected
        finally:
            self.select_combined()

    def zero_grad(self) -> None:
        """Zeroes every gradient row and the combined gradient, in place (``.grad`` stays a view)."""
        self.grads.zero_()
        if self.grad.data_ptr() != self.grads.data_ptr():
            self.grad.zero_()
        # Re-attach the views in case something set .grad to None (nn.Module.zero_grad does).
        if self._selected is None:
            self.select_combined()
        elif self._selected == "own":
            self._select_own_rows()
        else:
            self.select_task(self._selected)

    def combine(self, method: Union[str, Weighting] = "sum", *, scope: str = "shared", reduction: str = "sum",
                generator: Optional[torch.Generator] = None, orders: Optional[Sequence[Sequence[int]]] = None,
                main: Optional[TaskKey] = None, aux_weight: float = 0.3,
                symmetric: bool = False, **options) -> GradientCombination:
        """Combines the task rows into ``grad`` (see :func:`combine_gradients`) and points ``.grad`` at it.

        scope: "shared" (default) -- surgery on the shared parameters, each head gets its own task's
          gradient; "all" -- surgery on the whole vector (Pytorch-PCGrad's behaviour).
        main: the main task of "main-aux", by name or index (default: the first task).
        options: the method's parameters, e.g. ``flat.combine("cagrad", c=0.5)``.
        """
        if scope not in ("shared", "all"):
            raise ValueError(f"scope must be 'shared' or 'all', got {scope!r}")
        if self._selected is not None:
            raise RuntimeError(f"combine() called while .grad points at task row {self._selected}; "
                               f"leave the flat.task() block first")
        if self.num_tasks == 1:
            return GradientCombination(None, torch.ones(1, 1, dtype=torch.float64))
        boundaries = self.boundaries if scope == "shared" else None
        result = combine_gradients(self.grads, self.grad, method, boundaries=boundaries, reduction=reduction,
                                   generator=generator, orders=orders,
                                   main=self.task_index(main if main is not None else 0), aux_weight=aux_weight,
                                   symmetric=symmetric, **options)
        self.select_combined()
        return result
