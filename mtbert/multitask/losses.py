"""Task losses. Each takes the head's scores and the labels and returns a scalar mean loss.

STS offers four readings of its 0–5 similarity label:

- ``mse``: regression of the score onto the similarity, (s − y)².
- ``ce``: the paper's "uniform cross-entropy" family. We read it as binary cross-entropy of the
  score, taken as a logit, against the soft target y/5 ∈ [0, 1] — the same loss as paraphrase
  detection with a graded instead of a 0/1 label, so one cross-entropy serves all three tasks.
  The prediction is then 5·σ(s).
- ``cosine-mse``: SBERT's CosineSimilarityLoss, (s − y/5)², with s the cosine of the two
  embeddings (the ``cosine`` head without affine) or any score; the prediction is 5·s.
- ``cosent``: the CoSENT ranking loss (Su 2022), log(1 + Σ_{y_i > y_j} exp(λ(s_j − s_i))),
  λ = 20: only the order of the scores matters, which is what Pearson/Spearman reward.
"""
import torch
import torch.nn.functional as F

STS_LOSSES = ("mse", "ce", "cosine-mse", "cosent")
STS_MAX = 5.0
COSENT_SCALE = 20.0


def sst_loss(logits, labels):
    """logits [B, 5], labels [B] int64: cross-entropy."""
    return F.cross_entropy(logits, labels)


def para_loss(scores, labels):
    """scores [B] logits, labels [B] in {0, 1}: binary cross-entropy on the logit."""
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))


def cosent_loss(scores, labels, scale=COSENT_SCALE):
    """CoSENT: log(1 + Σ over pairs (i, j) with labels[i] > labels[j] of exp(scale·(s_j − s_i)))."""
    differences = scale * (scores[None, :] - scores[:, None])  # (i, j) → scale·(s_j − s_i)
    ordered = labels[:, None] > labels[None, :]
    terms = differences.masked_select(ordered)
    # logsumexp with the "1 +" as an extra zero term: stable for large differences.
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


def sts_loss(kind, scores, labels):
    """scores [B], labels [B] similarity in [0, 5]."""
    labels = labels.to(scores.dtype)
    if kind == "mse":
        return F.mse_loss(scores, labels)
    if kind == "ce":
        return F.binary_cross_entropy_with_logits(scores, labels / STS_MAX)
    if kind == "cosine-mse":
        return F.mse_loss(scores, labels / STS_MAX)
    if kind == "cosent":
        return cosent_loss(scores, labels)
    raise ValueError(f"sts loss must be one of {STS_LOSSES}, got {kind!r}")


def sts_prediction(kind, scores):
    """The similarity on the 0–5 scale that a score stands for under the loss ``kind``."""
    if kind == "mse":
        return scores
    if kind == "ce":
        return STS_MAX * torch.sigmoid(scores)
    if kind in ("cosine-mse", "cosent"):
        return STS_MAX * scores
    raise ValueError(f"sts loss must be one of {STS_LOSSES}, got {kind!r}")
