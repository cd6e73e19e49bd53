"""Parameter gradients split by segments of a batch.

One forward and one backward over a batch that concatenates several groups of sequences (the
segments, e.g. one per task), with each parameter's gradient from each segment's rows written
straight into that segment's destination (e.g. the task's row of a [K, P] gradient buffer):

    linear      dW_k = dY_kᵀ X_k,            db_k = Σ_{rows of k} dY
    LayerNorm   dγ_k = Σ_{rows of k} dY ∘ x̂,  dβ_k = Σ_{rows of k} dY
    bias+GELU   db_k = Σ_{rows of k} dZ
    embedding   dE_k[i] = Σ_{rows of k with id i} dY

The input gradients (dX = dY W, ...) are computed once for the whole batch. The ops return no
gradient for the parameters, so autograd neither computes the full dW nor accumulates into
``.grad``; the destinations are accumulated into (``+=``), like ``.grad``.

Rows: a segment is a range of sequences [o_k, o_{k+1}) of a right-padded [B, L] batch. An op's rows
are its input's leading dimensions flattened, in one of three layouts, told apart by their count:
B rows (one per sequence, e.g. a pooler), T packed real tokens (an unpadded encoder), B·L padded
tokens. Where two counts coincide (no padding; sequences of one token) the layouts coincide too.

The :class:`GradientSegments` context is entered around the forward; each op records its ranges
and destinations then, so the backward may run outside it. The dispatcher in ``__init__`` decides
when an op takes its segmented form; the functions here take tensors, ranges and destinations
and know nothing of the model.
"""
import contextvars
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import bias_gelu as _bias_gelu
from . import dropout_add_layer_norm as _dropout_add_layer_norm
from . import layer_norm as _layer_norm

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("mtbert_gradient_segments", default=None)

Ranges = List[Tuple[int, int]]


class GradientSegments:
    """Segments of a batch and where each parameter's per-segment gradient goes.

    attention_mask: [B, L], right-padded (ones then zeros per row; only the row sums are read).
    offsets: K + 1 sequence offsets, 0 = o_0 <= o_1 <= ... <= o_K = B: segment k is sequences
        [o_k, o_{k+1}) (it may be empty).
    destinations: id(parameter) -> K tensors of the parameter's shape, one per segment.
    """

    def __init__(self, attention_mask: torch.Tensor, offsets: Sequence[int],
                 destinations: Mapping[int, Sequence[torch.Tensor]]):
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 2-D tensor [batch, length], got {attention_mask!r}")
        B, L = attention_mask.shape
        offsets = [int(o) for o in offsets]
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != B or any(a > b for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"offsets must rise from 0 to the batch size {B}, got {offsets}")
        self.num_segments = len(offsets) - 1
        lengths = attention_mask.to(torch.bool).sum(1)
        token_offsets = F.pad(lengths.cumsum(0), (1, 0))[offsets].tolist()
        self._ranges: Dict[int, Ranges] = {}
        for rows, edges in ((B, offsets), (int(token_offsets[-1]), token_offsets), (B * L, [o * L for o in offsets])):
            ranges = list(zip(edges[:-1], edges[1:]))
            if self._ranges.setdefault(rows, ranges) != ranges:
                raise ValueError(f"two row layouts of {rows} rows split differently: is attention_mask right-padded?")
        self._destinations = {}
        for key, views in destinations.items():
            views = list(views)
            if len(views) != self.num_segments:
                raise ValueError(f"destinations[{key}] has {len(views)} tensors, expected one per segment "
                                 f"({self.num_segments})")
            self._destinations[key] = views

    def ranges(self, rows: int) -> Ranges:
        """The (begin, end) rows of each segment for an op input with ``rows`` rows."""
        try:
            return self._ranges[rows]
        except KeyError:
            raise ValueError(f"an op input has {rows} rows, none of the batch's layouts "
                             f"(sequences, packed tokens, padded tokens: {sorted(self._ranges)})") from None

    def destinations_of(self, param: Optional[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """The per-segment gradient tensors of ``param``; None when it needs no gradient."""
        if param is None or not param.requires_grad:
            return None
        views = self._destinations.get(id(param))
        if views is None:
            raise ValueError(f"a parameter of shape {tuple(param.shape)} requires grad but has no gradient "
                             "destinations: its gradient cannot be split by segment")
        if views[0].shape != param.shape:
            raise ValueError(f"the destinations of a parameter of shape {tuple(param.shape)} have shape "
                             f"{tuple(views[0].shape)}")
        return views

    def __enter__(self):
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc):
        _CURRENT.reset(self._token)
        return False


def current() -> Optional[GradientSegments]:
    """The active :class:`GradientSegments`, or None."""
    return _CURRENT.get()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _accumulate(destination: torch.Tensor, value: torch.Tensor):
    destination.add_(value.to(destination.dtype))


def _accumulate_row_sum(destination: torch.Tensor, rows: torch.Tensor):
    """destination += the sum of ``rows`` [M, N] over M, as a matrix-vector product (several times
    faster than ``sum(0)`` on 2 CPU cores, measured)."""
    if rows.dtype == destination.dtype:
        destination.addmv_(rows.t(), rows.new_ones(rows.shape[0]))
    else:
        _accumulate(destination, rows.sum(0))


def _accumulate_mm(destination: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """destination += a @ b, in place when the dtypes allow (no [out, in] temporary)."""
    if a.dtype == b.dtype == destination.dtype:
        destination.addmm_(a, b)
    else:
        _accumulate(destination, a @ b)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


# -- linear ---------------------------------------------------------------------------------------

class _SegmentedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, segments):
        # Looked up before the autocast copies below: the destinations are keyed by the parameters.
        ctx.weight_destinations = segments.destinations_of(weight)
        ctx.bias_destinations = None if bias is None else segments.destinations_of(bias)
        dtype = _autocast_dtype(x.device.type)
        if dtype is not None:  # what autocast does to a linear layer
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.ranges = segments.ranges(x.numel() // x.shape[-1])
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_y.matmul(weight) if ctx.needs_input_grad[0] else None
        dy, xs = _rows(grad_y), _rows(x)
        for k, (begin, end) in enumerate(ctx.ranges):
            if begin == end:
                continue
            if ctx.weight_destinations is not None:
                _accumulate_mm(ctx.weight_destinations[k], dy[begin:end].t(), xs[begin:end])
            if ctx.bias_destinations is not None:
                _accumulate_row_sum(ctx.bias_destinations[k], dy[begin:end])
        return grad_x, None, None, None


def linear(x, weight: torch.Tensor, bias: Optional[torch.Tensor], segments: GradientSegments):
    """y = x Wᵀ + b (``bias`` may be None); the weight and bias gradients go to their per-segment
    destinations."""
    return _SegmentedLinear.apply(x, weight, bias, segments)


# -- add + LayerNorm ------------------------------------------------------------------------------

class _SegmentedAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, segments, use_triton):
        N = x.shape[-1]
        ctx.ranges = segments.ranges(x.numel() // N)
        ctx.destinations = segments.destinations_of(weight), segments.destinations_of(bias)
        ctx.use_triton, ctx.has_residual = use_triton, residual is not None
        ctx.input_dtypes = x.dtype, None if residual is None else residual.dtype
        if use_triton:
            y, mean, rstd = _layer_norm.add_layer_norm_forward(x, residual, weight, bias, eps)
            ctx.save_for_backward(x, residual, weight, bias, mean, rstd)
            return y
        z = x if residual is None else x + residual
        if _autocast_dtype(x.device.type) is not None:
            z = z.float()  # autocast runs layer_norm in float32
        y, mean, rstd = torch.native_layer_norm(z, [N], weight, bias, eps)
        ctx.save_for_backward(z, None, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, residual, weight, bias, mean, rstd = ctx.saved_tensors
        weight_destinations, bias_destinations = ctx.destinations
        N = z.shape[-1]
        dy = _rows(grad_y)
        if ctx.use_triton:
            x, dy = _rows(z), dy.contiguous()  # z is x itself on this path
            residual = None if residual is None else _rows(residual)
            pieces = []
            for k, (begin, end) in enumerate(ctx.ranges):
                if begin == end:
                    continue
                grad_z_k, grad_weight, grad_bias = _layer_norm.add_layer_norm_backward(
                    dy[begin:end], x[begin:end], None if residual is None else residual[begin:end], weight,
                    mean[begin:end], rstd[begin:end])
                pieces.append(grad_z_k)
                if weight_destinations is not None:
                    _accumulate(weight_destinations[k], grad_weight)
                if bias_destinations is not None:
                    _accumulate(bias_destinations[k], grad_bias)
            grad_z = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(grad_y.shape)
        else:  # PyTorch's fused LayerNorm backward on each segment's rows, into one grad_z
            z, mean, rstd = _rows(z), mean.reshape(-1, 1), rstd.reshape(-1, 1)
            grad_z = torch.empty_like(z)
            mask = [True, weight_destinations is not None, bias_destinations is not None]
            for k, (begin, end) in enumerate(ctx.ranges):
                if begin == end:
                    continue
                grad_weight, grad_bias = weight.new_empty(N), weight.new_empty(N)
                torch.ops.aten.native_layer_norm_backward.out(
                    dy[begin:end], z[begin:end], [N], mean[begin:end], rstd[begin:end], weight, bias, mask,
                    out0=grad_z[begin:end], out1=grad_weight, out2=grad_bias)
                if weight_destinations is not None:
                    _accumulate(weight_destinations[k], grad_weight)
                if bias_destinations is not None:
                    _accumulate(bias_destinations[k], grad_bias)
            grad_z = grad_z.view(grad_y.shape)
        x_dtype, residual_dtype = ctx.input_dtypes
        grad_residual = grad_z.to(residual_dtype) if ctx.has_residual else None
        return grad_z.to(x_dtype), grad_residual, None, None, None, None, None


def add_layer_norm(x, residual, weight, bias, eps, segments: GradientSegments, use_triton: bool):
    """y = LayerNorm(x + residual) (residual may be None), its weight and bias gradients split by
    segment. With ``use_triton`` x and residual must be contiguous [..., N] of one dtype."""
    if residual is not None and not use_triton:
        residual = residual.expand_as(x)  # a broadcast residual's gradient is reduced by autograd
    return _SegmentedAddLayerNorm.apply(x, residual, weight, bias, eps, segments, use_triton)


# -- dropout + add + LayerNorm (the CPU kernel) ---------------------------------------------------

class _SegmentedDropoutAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, segments):
        ctx.ranges = segments.ranges(x.numel() // x.shape[-1])
        ctx.destinations = segments.destinations_of(weight), segments.destinations_of(bias)
        ctx.dropout_p, ctx.x_dtype = dropout_p, x.dtype
        y, z, mean, rstd, keep = _dropout_add_layer_norm.forward_op(x, residual, weight, bias, eps, dropout_p)
        ctx.save_for_backward(z, keep, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        z, keep, weight, mean, rstd = ctx.saved_tensors
        row_bounds = [begin for begin, _ in ctx.ranges] + [ctx.ranges[-1][1]]
        grad_x, grad_residual, grad_weight, grad_bias = _dropout_add_layer_norm.backward_op(
            grad_y, z, keep, weight, mean, rstd, ctx.dropout_p, row_bounds, ctx.x_dtype)
        for destinations, grads in zip(ctx.destinations, (grad_weight, grad_bias)):
            if destinations is not None:
                for k, (begin, end) in enumerate(ctx.ranges):
                    if begin != end:
                        _accumulate(destinations[k], grads[k])
        return grad_x.view(grad_y.shape), grad_residual.view(grad_y.shape), None, None, None, None, None


def dropout_add_layer_norm(x, residual, weight, bias, eps, dropout_p, segments: GradientSegments):
    """y = LayerNorm(dropout(x) + residual) with the extension's CPU kernel (x float32 or bfloat16,
    a float32 residual of x's shape), its weight and bias gradients split by segment in the
    kernel's backward."""
    return _SegmentedDropoutAddLayerNorm.apply(x, residual, weight, bias, eps, dropout_p, segments)


# -- bias + GELU ----------------------------------------------------------------------------------

class _SegmentedBiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, segments, use_triton):
        ctx.ranges = segments.ranges(x.numel() // x.shape[-1])
        ctx.destinations = segments.destinations_of(bias)
        ctx.use_triton, ctx.x_dtype = use_triton, x.dtype
        if use_triton:
            ctx.save_for_backward(x, bias)
            return _bias_gelu.bias_gelu_forward(x, bias)
        z = x + bias
        ctx.save_for_backward(z, None)
        return F.gelu(z, approximate="none")

    @staticmethod
    def backward(ctx, grad_y):
        saved, bias = ctx.saved_tensors
        destinations = ctx.destinations
        if ctx.use_triton:
            x, dy = _rows(saved), _rows(grad_y).contiguous()
            pieces = []
            for k, (begin, end) in enumerate(ctx.ranges):
                if begin == end:
                    continue
                grad_x_k, grad_bias = _bias_gelu.bias_gelu_backward(dy[begin:end], x[begin:end], bias)
                pieces.append(grad_x_k)
                if destinations is not None:
                    _accumulate(destinations[k], grad_bias)
            grad_x = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(grad_y.shape)
        else:
            grad_x = torch.ops.aten.gelu_backward(grad_y, saved, approximate="none")
            rows = _rows(grad_x)
            for k, (begin, end) in enumerate(ctx.ranges):
                if begin != end and destinations is not None:
                    _accumulate_row_sum(destinations[k], rows[begin:end])
        return grad_x.to(ctx.x_dtype), None, None, None


def bias_gelu(x, bias, segments: GradientSegments, use_triton: bool):
    """y = GELU(x + bias), the bias gradient split by segment. With ``use_triton`` x must be
    contiguous."""
    return _SegmentedBiasGelu.apply(x, bias, segments, use_triton)


# -- embedding ------------------------------------------------------------------------------------

class _SegmentedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, segments):
        ctx.ranges = segments.ranges(ids.numel())
        ctx.destinations = segments.destinations_of(weight)
        ctx.padding_idx = padding_idx
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_y):
        (ids,) = ctx.saved_tensors
        ids, dy = ids.reshape(-1), _rows(grad_y)
        if ctx.padding_idx is not None:
            padding = ids == ctx.padding_idx
            if bool(padding.any()):  # the padding row gets no gradient, as in nn.Embedding
                dy = dy.masked_fill(padding[:, None], 0.0)
        for k, (begin, end) in enumerate(ctx.ranges):
            if begin != end:
                ctx.destinations[k].index_add_(0, ids[begin:end], dy[begin:end].to(ctx.destinations[k].dtype))
        return None, None, None, None


def embedding(ids, weight, padding_idx, segments: GradientSegments):
    """Rows of ``weight`` at ``ids`` (as ``F.embedding``), the weight gradient split by segment."""
    return _SegmentedEmbedding.apply(ids, weight, padding_idx, segments)
