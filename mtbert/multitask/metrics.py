"""Dev metrics of the three tasks and the CS224N overall score."""
import torch


def accuracy(predictions, labels) -> float:
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.shape != labels.shape or predictions.numel() == 0:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} "
                         "must have the same non-empty shape")
    return (predictions == labels.to(predictions.dtype)).double().mean().item()


def pearson(x, y) -> float:
    """Pearson correlation in float64; NaN when either vector is constant (as numpy gives)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.shape != y.shape or x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"pearson needs two 1-D vectors of the same length >= 2, got {tuple(x.shape)}, {tuple(y.shape)}")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx.square().sum() * dy.square().sum()).sqrt()
    return (dx @ dy / denominator).item() if denominator > 0 else float("nan")


def _ranks(x):
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata does)."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    # Average the ranks within each run of equal values.
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, inverse, ranks[order])
    ranks[order] = (sums / counts.to(x.dtype))[inverse]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    return pearson(_ranks(x.flatten()), _ranks(y.flatten())) if x.shape == y.shape else pearson(x, y)


def overall_score(sst_accuracy, para_accuracy, sts_pearson) -> float:
    """The CS224N leaderboard's overall score: (sst + para + (sts + 1) / 2) / 3."""
    return (sst_accuracy + para_accuracy + (sts_pearson + 1.0) / 2.0) / 3.0
