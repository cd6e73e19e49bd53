"""BertModel: a minBERT encoder with the architecture and parameter names of
``transformers.BertModel``, so Hugging Face checkpoints load with ``strict=True``.

embeddings (word + position + token type, LayerNorm, dropout)
  -> N x [self-attention -> dense -> dropout -> add+LayerNorm
          -> dense -> bias+GELU -> dense -> dropout -> add+LayerNorm]
  -> tanh pooler on [CLS]
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import BertConfig


UNPAD_CHOICES = ("auto", True, False)
# On the CPU, BertModel.unpad="auto" runs a right-padded batch on its real tokens only when at
# least this fraction of its positions is padding; below it the padded path (no gather/scatter
# copies) is as fast. Measured on all-MiniLM-L6-v2, real SST sentences, L = 32, padding 0-30%, the
# two paths interleaved, the least CPU time of 4-8 runs on 1 thread (the shared 2-core EPYC ran at
# load 5-7: wall times were the other jobs'; noisy to about ±3%). Training step (B = 16, dropout):
# break-even near 1% padding, unpadded 2-4% faster at 1-3%, 10% at 10%, 22% at 30%. Inference
# (B = 128, no grad; SDPA's fused CPU kernel on the padded path): break-even near 6%, padded 4-6%
# faster at 1-3%. Training dominates a run's time, hence 2% (issue 12; script not committed).
CPU_UNPAD_MIN_PADDING = 0.02


class BertModelOutput(dict):
    """The encoder's output, readable as attributes (``out.last_hidden_state``, the Hugging Face
    convention), as a dict (``out['pooler_output']``, the CS224N starter) and by position."""

    def __init__(self, last_hidden_state, pooler_output):
        super().__init__(last_hidden_state=last_hidden_state, pooler_output=pooler_output)

    @property
    def last_hidden_state(self):
        return self["last_hidden_state"]

    @property
    def pooler_output(self):
        return self["pooler_output"]

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self):
        return tuple(self.values())


class PackedSequences(NamedTuple):
    """Where each sequence lies in a packed [T, H] batch of real tokens (the unpadded path)."""

    cu_seqlens: torch.Tensor  # [B + 1] int32 token offsets
    max_seqlen: int


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids=None):
        """input_ids, token_type_ids: [B, L] with positions 0…L-1, or packed [T] with position_ids [T]."""
        # Positions per token, not broadcast over the batch: every op input then has one row per token.
        positions = position_ids if position_ids is not None else torch.arange(
            input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        x = (kernels.embedding(input_ids, self.word_embeddings.weight, self.word_embeddings.padding_idx)
             + kernels.embedding(token_type_ids, self.token_type_embeddings.weight))
        x = kernels.add_layer_norm(x, kernels.embedding(positions, self.position_embeddings.weight),
                                   self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)
        return self.dropout(x)


_QKV_NAMES = ("query", "key", "value")


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with the query, key and value projections in one [3H, H] weight
    and [3H] bias (one matmul instead of three: twice as fast on 2 CPU cores, measured). Its
    state dict reads and writes them as Hugging Face's ``query``/``key``/``value`` weights and
    biases (see :func:`_split_qkv` and :func:`_fuse_qkv`), so checkpoints load both ways."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # Built from three nn.Linear, as transformers builds its projections: their default
        # initialisation draws from the random stream, so that a seeded BertModel's weights (after
        # _init_weights) stay equal to a seeded transformers.BertModel's.
        query, key, value = (nn.Linear(config.hidden_size, config.hidden_size) for _ in _QKV_NAMES)
        self.qkv_weight = nn.Parameter(torch.cat([query.weight, key.weight, value.weight]).detach())
        self.qkv_bias = nn.Parameter(torch.cat([query.bias, key.bias, value.bias]).detach())
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)  # its p goes to the attention kernels
        self._register_state_dict_hook(_split_qkv)
        self._register_load_state_dict_pre_hook(_fuse_qkv)

    def forward(self, x, mask_bias):
        """x: [B, L, H]; mask_bias: None (every key is real) or [B, 1, 1, L] additive (0 to attend,
        a large negative to skip). Or, on the unpadded path, x: [T, H] packed tokens and mask_bias
        a PackedSequences."""
        if isinstance(mask_bias, PackedSequences):
            return self._forward_packed(x, mask_bias)
        B, L, H = x.shape
        qkv = kernels.linear(x, self.qkv_weight, self.qkv_bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, head_dim) each, views
        # SDPA, or with dropout on the CPU matmul, fused softmax+dropout, matmul (see kernels.attention).
        context = kernels.attention(q, k, v, mask_bias, self._dropout_p(),
                                    scale=1.0 / math.sqrt(self.head_dim))  # (B, heads, L, head_dim)
        return context.transpose(1, 2).reshape(B, L, H)

    def _forward_packed(self, x, packed: PackedSequences):
        T, H = x.shape
        qkv = kernels.linear(x, self.qkv_weight, self.qkv_bias).view(T, 3, self.num_heads, self.head_dim)
        context = kernels.varlen_attention_qkv(
            qkv, packed.cu_seqlens, packed.max_seqlen,
            dropout_p=self._dropout_p(), softmax_scale=1.0 / math.sqrt(self.head_dim),
        )  # (T, heads, head_dim)
        return context.reshape(T, H)

    def _dropout_p(self):
        return _dropout_p(self.dropout, self.training)


def _dropout_p(dropout: nn.Dropout, training: bool) -> float:
    """The probability a kernel with dropout applies: the module's in training mode, else 0."""
    return dropout.p if training else 0.0


def hugging_face_named(name, tensor):
    """[(name, tensor)] of one of our parameters (its value or its gradient) under Hugging Face's
    names, the names of the state dict: a fused ``qkv_weight`` / ``qkv_bias`` is three pairs, its
    query, key and value parts (views); any other parameter is itself."""
    prefix, fused, kind = ("." + name).rpartition(".qkv_")
    if not fused or kind not in ("weight", "bias"):
        return [(name, tensor)]
    return [(f"{prefix[1:]}{'.' if prefix else ''}{part}.{kind}", piece)
            for part, piece in zip(_QKV_NAMES, tensor.chunk(3))]


def _split_qkv(module, state_dict, prefix, local_metadata):
    """State-dict hook: the fused parameters as Hugging Face's query/key/value weights and biases,
    in its key order (views, no copies)."""
    weights = hugging_face_named(prefix + "qkv_weight", state_dict.pop(prefix + "qkv_weight"))
    biases = hugging_face_named(prefix + "qkv_bias", state_dict.pop(prefix + "qkv_bias"))
    for (weight_name, weight), (bias_name, bias) in zip(weights, biases):
        state_dict[weight_name] = weight
        state_dict[bias_name] = bias


def _fuse_qkv(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load pre-hook: Hugging Face's query/key/value weights and biases into the fused parameters.
    When some of the six are absent they are left as they are: the fused parameter is then
    reported missing and the others unexpected."""
    for kind in ("weight", "bias"):
        names = [prefix + f"{name}.{kind}" for name in _QKV_NAMES]
        if all(name in state_dict for name in names):
            state_dict[prefix + f"qkv_{kind}"] = torch.cat([state_dict.pop(name) for name in names])


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)  # applied by the fused kernel, not called

    def forward(self, x, residual):
        return kernels.dropout_add_layer_norm(kernels.linear(x, self.dense.weight, self.dense.bias), residual,
                                              self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                                              _dropout_p(self.dropout, self.training))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, mask_bias):
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return kernels.linear_bias_gelu(x, self.dense.weight, self.dense.bias)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)  # applied by the fused kernel, not called

    def forward(self, x, residual):
        return kernels.dropout_add_layer_norm(kernels.linear(x, self.dense.weight, self.dense.bias), residual,
                                              self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                                              _dropout_p(self.dropout, self.training))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, mask_bias):
        attended = self.attention(x, mask_bias)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, mask_bias):
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return torch.tanh(kernels.linear(hidden_states[:, 0], self.dense.weight, self.dense.bias))


class BertModel(nn.Module):
    """A BERT encoder. ``forward(input_ids, attention_mask, token_type_ids)`` returns
    :class:`BertModelOutput` with ``last_hidden_state`` [B, L, H] and ``pooler_output`` [B, H]."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        # Which path runs a right-padded batch (see forward): "auto" chooses per batch, True always
        # runs the real tokens only, False always the padded path (the reference). Not a config
        # field: it changes speed, not the model.
        self.unpad = "auto"
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # The initialisation of the original BERT (and of Hugging Face's BertPreTrainedModel).
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertSelfAttention):
            for weight in module.qkv_weight.data.chunk(3):  # one draw per projection, as transformers does
                nn.init.normal_(weight, mean=0.0, std=std)
            nn.init.zeros_(module.qkv_bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, name_or_path, **config_overrides) -> "BertModel":
        """Loads a Hugging Face BERT checkpoint from a directory, the bundled all-MiniLM-L6-v2, or
        the local Hugging Face cache. Nothing is downloaded. ``config_overrides`` replace config
        values (e.g. ``hidden_dropout_prob=0.3``)."""
        from .pretrained import load_pretrained

        return load_pretrained(cls, name_or_path, **config_overrides)

    def save_pretrained(self, directory) -> None:
        """Writes ``config.json`` and ``model.safetensors``, loadable by us and by Hugging Face."""
        from .pretrained import save_pretrained

        save_pretrained(self, directory)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D tensor [batch, length], got {_describe(input_ids)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        B, L = input_ids.shape
        if L == 0 or B == 0:
            raise ValueError(f"input_ids must have at least one row and one position, got shape {tuple(input_ids.shape)}")
        if L > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has length {L}, longer than max_position_embeddings={cfg.max_position_embeddings}; "
                "truncate the sequences (Tokenizer(..., max_length=...))"
            )
        _check_ids("input_ids", input_ids, cfg.vocab_size)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {_describe(attention_mask)}"
                )
            if attention_mask.is_complex():
                raise ValueError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")
        if token_type_ids is not None:
            if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.shape != input_ids.shape:
                raise ValueError(
                    f"token_type_ids must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {_describe(token_type_ids)}"
                )
            if token_type_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"token_type_ids must be int64 or int32, got {token_type_ids.dtype}")
            _check_ids("token_type_ids", token_type_ids, cfg.type_vocab_size)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> BertModelOutput:
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        lengths = self._unpadded_lengths(input_ids, attention_mask)
        if lengths is not None:
            return self._forward_unpadded(input_ids, token_type_ids, lengths)
        x = self.embeddings(input_ids, token_type_ids)
        hidden = self.encoder(x, _attention_mask_bias(attention_mask, x))
        return BertModelOutput(last_hidden_state=hidden, pooler_output=self.pooler(hidden))

    def _unpadded_lengths(self, input_ids, attention_mask):
        """The sequence lengths [B] when this batch runs on its real tokens only, else None.

        Only right-padded masks can (``_right_padded_lengths``). With ``unpad="auto"``, off the
        CPU every such batch does (the varlen kernels); on the CPU only a batch with at least
        ``CPU_UNPAD_MIN_PADDING`` padding, as gathering and scattering the tokens costs more than
        the padding saves below it."""
        if not (isinstance(self.unpad, bool) or self.unpad == "auto"):
            raise ValueError(f"unpad must be one of {UNPAD_CHOICES}, got {self.unpad!r}")
        if self.unpad is False:
            return None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = _right_padded_lengths(attention_mask)
        # Compiled, the graph cannot branch on the padding (see _right_padded_lengths).
        if lengths is None or self.unpad is True or input_ids.device.type != "cpu" or torch.compiler.is_compiling():
            return lengths
        padding = 1.0 - int(lengths.sum()) / attention_mask.numel()
        return lengths if padding >= CPU_UNPAD_MIN_PADDING else None

    def _forward_unpadded(self, input_ids, token_type_ids, lengths):
        """Gathers the real tokens once into [T, H], runs every layer on them (only attention
        needs the sequence boundaries) and scatters back once. Padding positions of
        ``last_hidden_state`` are zero; real positions equal the padded path's."""
        B, L = input_ids.shape
        tokens = (torch.arange(L, device=input_ids.device) < lengths[:, None]).reshape(-1).nonzero().squeeze(1)  # (T,)
        # Compiled, the bound is the padded width L (a shape, so no data-dependent int, and a dynamic
        # L does not recompile); eager, the longest sequence (the CPU path pads to it).
        max_seqlen = L if torch.compiler.is_compiling() else int(lengths.max())
        packed = PackedSequences(F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), max_seqlen)
        x = self.embeddings(input_ids.reshape(-1)[tokens], token_type_ids.reshape(-1)[tokens], tokens % L)  # (T, H)
        x = self.encoder(x, packed)
        hidden = x.new_zeros(B * L, x.shape[-1]).index_copy_(0, tokens, x).view(B, L, -1)  # (B, L, H), one copy
        return BertModelOutput(last_hidden_state=hidden, pooler_output=self.pooler(hidden))


def _right_padded_lengths(attention_mask):
    """The lengths [B] when every row of the mask is ones then zeros and has at least one token;
    None otherwise (left padding, holes, empty rows: those take the padded path)."""
    keep = attention_mask.to(torch.bool)
    lengths = keep.sum(1)
    ones_then_zeros = torch.arange(keep.shape[1], device=keep.device) < lengths[:, None]
    right_padded = (ones_then_zeros == keep).all() & (lengths > 0).all()
    if torch.compiler.is_compiling():
        # torch.compile cannot branch on the mask's values: a compiled model takes the unpadded
        # path and checks the mask in the graph instead.
        torch._assert_async(right_padded, "a compiled BertModel needs right-padded attention masks with a token in "
                                          "every row; set model.unpad = False before compiling for other masks")
        return lengths
    return lengths if bool(right_padded) else None


def _check_ids(name, ids, bound):
    """ids must lie in [0, bound): a ValueError in eager mode; compiled, an assert in the graph
    (torch.compile cannot branch on tensor values)."""
    lo, hi = torch.aminmax(ids)
    if torch.compiler.is_compiling():
        torch._assert_async((lo >= 0) & (hi < bound), f"{name} must lie in [0, {bound})")
    elif lo < 0 or hi >= bound:
        raise ValueError(f"{name} must lie in [0, {bound}), got values in [{int(lo)}, {int(hi)}]")


def _attention_mask_bias(attention_mask, x):
    """The additive mask [B, 1, 1, L] of the padded path, or None when every position is real.

    As in Hugging Face, padding gets the most negative finite value, not -inf, so a row whose mask
    is all zero softmaxes to a uniform distribution instead of NaN; finite in the dtype attention
    runs in (autocast's, e.g. bfloat16, whose range float32's minimum would overflow). Compiled,
    always the mask: the graph cannot branch on its values."""
    if attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all())):
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    keep = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, L)
    return torch.zeros(keep.shape, dtype=dtype, device=x.device).masked_fill_(~keep, torch.finfo(dtype).min)


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__}"
