"""Multitask fine-tuning on SST-5, Quora and STS-B: data, heads, losses, the model, training,
evaluation, checkpoints and plots. Composes the encoder (``mtbert.model``) and the optimizer
(``mtbert.optim``); nothing outside the CLI entry points imports from here."""
from .model import MultitaskBert

__all__ = ["MultitaskBert"]
