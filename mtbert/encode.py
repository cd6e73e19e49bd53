"""Sentence embeddings from a BERT encoder (the sentence-transformers convention)."""
import functools

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import BertModel
from .pretrained import DEFAULT_MODEL
from .tokenizer import Tokenizer


def mean_pool(hidden_states, attention_mask):
    """Average of the token vectors where attention_mask is 1. hidden: [B, L, H]; mask: [B, L]."""
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, L, 1)
    # clamp: an all-padding row gives the zero vector, not 0/0.
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def cls_pool(hidden_states, attention_mask=None):
    """The [CLS] token's vector. hidden: [B, L, H]."""
    return hidden_states[:, 0]


# The one meaning of each pooling name, shared by ``encode`` and ``MultitaskBert``: "cls" is the raw
# [CLS] vector (sentence-transformers' CLS pooling), "pooler" is tanh(W·[CLS]) (BERT's pooler, the
# CS224N starter's ``pooler_output``).
POOLINGS = ("mean", "cls", "pooler")


def pool(output, attention_mask, pooling):
    """Sentence vectors [B, H] of a :class:`BertModelOutput`, by ``pooling`` (one of POOLINGS)."""
    if pooling == "mean":
        return mean_pool(output.last_hidden_state, attention_mask)
    if pooling == "cls":
        return cls_pool(output.last_hidden_state)
    if pooling == "pooler":
        return output.pooler_output
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@functools.lru_cache(maxsize=4)
def _load(name):
    return BertModel.from_pretrained(name).eval(), Tokenizer.from_pretrained(name)


@torch.no_grad()
def encode(sentences, model=DEFAULT_MODEL, tokenizer=None, pooling="mean", batch_size=64,
           normalize=True, max_length=None, device=None, progress=False):
    """Embeds sentences; returns a float32 tensor [N, H] on the CPU.

    ``model`` is a name or directory (see ``BertModel.from_pretrained``) or a ``BertModel``;
    ``tokenizer`` defaults to the one stored with the model. Sentences are processed in order of
    length so that batches carry little padding; the output keeps the input order.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if isinstance(sentences, str):
        sentences = [sentences]
    if isinstance(model, BertModel):
        if tokenizer is None:
            if not hasattr(model, "model_dir"):
                raise ValueError("tokenizer is required when model was not loaded with from_pretrained")
            tokenizer = Tokenizer.from_pretrained(model.model_dir)
    else:
        model, default_tokenizer = _load(str(model))
        tokenizer = tokenizer or default_tokenizer
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval().to(device)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="encode", disable=not progress):
        index = order[start:start + batch_size]
        batch = tokenizer([sentences[i] for i in index], max_length=max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        pooled = pool(model(**batch), batch["attention_mask"], pooling).float()
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        out[index] = pooled.cpu()
    model.train(was_training)
    return out
