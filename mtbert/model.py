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


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x, mask_bias):
        """x: [B, L, H]; mask_bias: [B, 1, 1, L] additive (0 to attend, a large negative to skip).
        Or, on the unpadded path, x: [T, H] packed tokens and mask_bias a PackedSequences."""
        if isinstance(mask_bias, PackedSequences):
            return self._forward_packed(x, mask_bias)
        B, L, H = x.shape

        def heads(t):
            return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, L, head_dim)

        q, k, v = (heads(kernels.linear(x, m.weight, m.bias)) for m in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, heads, L, L)
        probs = self.dropout(torch.softmax(scores + mask_bias, dim=-1))
        context = torch.matmul(probs, v)  # (B, heads, L, head_dim)
        return context.transpose(1, 2).reshape(B, L, H)

    def _forward_packed(self, x, packed: PackedSequences):
        T, H = x.shape
        # One matmul for the three projections (twice as fast as three on 2 CPU cores, measured).
        projections = (self.query, self.key, self.value)  # acting as one (3H, H) weight
        qkv = kernels.linear(x, [m.weight for m in projections], [m.bias for m in projections])
        q, k, v = qkv.view(T, 3, self.num_heads, self.head_dim).unbind(1)  # (T, heads, head_dim)
        context = kernels.varlen_attention(
            q, k, v, packed.cu_seqlens, packed.max_seqlen,
            dropout_p=self.dropout.p if self.training else 0.0, softmax_scale=1.0 / math.sqrt(self.head_dim),
        )  # (T, heads, head_dim)
        return context.reshape(T, H)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        x = self.dropout(kernels.linear(x, self.dense.weight, self.dense.bias))
        return kernels.add_layer_norm(x, residual, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)


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
        # The bias is added inside the fused bias+GELU op rather than by the matmul.
        return kernels.bias_gelu(kernels.linear(x, self.dense.weight), self.dense.bias)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        x = self.dropout(kernels.linear(x, self.dense.weight, self.dense.bias))
        return kernels.add_layer_norm(x, residual, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)


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
        # Run right-padded batches on their real tokens only (see forward); False forces the
        # padded path, the reference. Not a config field: it changes speed, not the model.
        self.unpad = True
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # The initialisation of the original BERT (and of Hugging Face's BertPreTrainedModel).
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
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
        lo, hi = torch.aminmax(input_ids)
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got values in [{int(lo)}, {int(hi)}]")
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
            lo, hi = torch.aminmax(token_type_ids)
            if lo < 0 or hi >= cfg.type_vocab_size:
                raise ValueError(
                    f"token_type_ids must lie in [0, {cfg.type_vocab_size}), got values in [{int(lo)}, {int(hi)}]"
                )

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> BertModelOutput:
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        lengths = _right_padded_lengths(attention_mask) if self.unpad else None
        if lengths is not None:
            return self._forward_unpadded(input_ids, token_type_ids, lengths)
        x = self.embeddings(input_ids, token_type_ids)
        # Additive mask as in Hugging Face: the dtype's most negative finite value, not -inf, so a
        # row whose mask is all zero softmaxes to a uniform distribution instead of NaN.
        keep = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, L)
        mask_bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        mask_bias.masked_fill_(~keep, torch.finfo(x.dtype).min)
        hidden = self.encoder(x, mask_bias)
        return BertModelOutput(last_hidden_state=hidden, pooler_output=self.pooler(hidden))

    def _forward_unpadded(self, input_ids, token_type_ids, lengths):
        """Gathers the real tokens once into [T, H], runs every layer on them (only attention
        needs the sequence boundaries) and scatters back once. Padding positions of
        ``last_hidden_state`` are zero; real positions equal the padded path's."""
        B, L = input_ids.shape
        tokens = (torch.arange(L, device=input_ids.device) < lengths[:, None]).reshape(-1).nonzero().squeeze(1)  # (T,)
        packed = PackedSequences(F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), int(lengths.max()))
        x = self.embeddings(input_ids.reshape(-1)[tokens], token_type_ids.reshape(-1)[tokens], tokens % L)  # (T, H)
        x = self.encoder(x, packed)
        hidden = x.new_zeros(B * L, x.shape[-1]).index_copy(0, tokens, x).view(B, L, -1)  # (B, L, H)
        return BertModelOutput(last_hidden_state=hidden, pooler_output=self.pooler(hidden))


def _right_padded_lengths(attention_mask):
    """The lengths [B] when every row of the mask is ones then zeros and has at least one token;
    None otherwise (left padding, holes, empty rows: those take the padded path)."""
    keep = attention_mask.to(torch.bool)
    lengths = keep.sum(1)
    right_padded = torch.arange(keep.shape[1], device=keep.device) < lengths[:, None]
    if not torch.equal(keep, right_padded) or not bool(lengths.min() > 0):
        return None
    return lengths


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__}"
