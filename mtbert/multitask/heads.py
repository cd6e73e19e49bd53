"""Task heads on top of pooled sentence embeddings.

SST-5: pooled → dropout → Linear(H, 5) (the CS224N baseline).
Sentence pairs (paraphrase, STS), each returning one score per pair:

- ``concat``: [u; v] → dropout → Linear(2H, 1), the CS224N baseline.
- ``cosine``: a·cos(u, v) + b; with ``affine=False`` just cos(u, v), as SBERT trains STS.
- ``sbert``: (u, v, |u−v|) → dropout → Linear(3H, 1), the SBERT classification objective
  (Reimers & Gurevych 2019, §3) and the paper's final choice.
- ``cross``: the pair encoded together ([CLS] a [SEP] b [SEP]), pooled → dropout → Linear(H, 1);
  the cross-encoder, which the paper did not try.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

PAIR_HEADS = ("concat", "cosine", "sbert", "cross")
SST_CLASSES = 5


class SentimentHead(nn.Module):
    def __init__(self, hidden_size, dropout, num_classes=SST_CLASSES):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, pooled):
        """pooled: [B, H] → logits [B, num_classes]."""
        return self.classifier(self.dropout(pooled))


class LinearPairHead(nn.Module):
    """A linear score of pair features: [u; v] (``concat``) or (u, v, |u−v|) (``sbert``)."""

    joint = False

    def __init__(self, hidden_size, dropout, features="sbert"):
        super().__init__()
        if features not in ("concat", "sbert"):
            raise ValueError(f"features must be 'concat' or 'sbert', got {features!r}")
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear((2 if features == "concat" else 3) * hidden_size, 1)

    def forward(self, u, v):
        """u, v: [B, H] → scores [B]."""
        parts = [u, v] if self.features == "concat" else [u, v, (u - v).abs()]
        return self.linear(self.dropout(torch.cat(parts, dim=-1))).squeeze(-1)


class CosinePairHead(nn.Module):
    """score = scale·cos(u, v) + bias with a learnable scale and bias (initialised to map the
    cosine onto the target's range), or the bare cosine when ``affine`` is None."""

    joint = False

    def __init__(self, affine=(1.0, 0.0)):
        super().__init__()
        if affine is None:
            self.scale = self.bias = None
        else:
            self.scale = nn.Parameter(torch.tensor(float(affine[0])))
            self.bias = nn.Parameter(torch.tensor(float(affine[1])))

    def forward(self, u, v):
        """u, v: [B, H] → scores [B]."""
        cosine = F.cosine_similarity(u, v, dim=-1)
        return cosine if self.scale is None else self.scale * cosine + self.bias


class CrossPairHead(nn.Module):
    """Scores a pair from the pooled joint encoding [CLS] a [SEP] b [SEP]."""

    joint = True

    def __init__(self, hidden_size, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, pooled):
        """pooled: [B, H] → scores [B]."""
        return self.linear(self.dropout(pooled)).squeeze(-1)


def make_pair_head(kind, hidden_size, dropout, cosine_affine=(1.0, 0.0)):
    if kind in ("concat", "sbert"):
        return LinearPairHead(hidden_size, dropout, features=kind)
    if kind == "cosine":
        return CosinePairHead(cosine_affine)
    if kind == "cross":
        return CrossPairHead(hidden_size, dropout)
    raise ValueError(f"pair head must be one of {PAIR_HEADS}, got {kind!r}")
