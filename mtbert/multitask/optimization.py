"""The gradient path of a multitask step: per-task backward, combination of the task gradients,
the AdamW update. The trainer sees only :class:`GradientPath`'s four methods."""
import torch

GRAD_METHODS = ("sum", "pcgrad", "main-aux")


def decay_groups(parameters, weight_decay):
    """AdamW parameter groups: no weight decay on biases and LayerNorm weights (1-D tensors), as
    in BERT's original fine-tuning recipe."""
    parameters = list(parameters)
    return [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]


class ReferenceGradientPath:
    """Plain PyTorch: autograd sums the task gradients in ``.grad``, ``torch.optim.AdamW`` steps.
    Supports only ``grad_method='sum'``."""

    def __init__(self, model, config):
        if config.grad_method != "sum":
            raise ValueError(f"the reference gradient path supports only grad_method='sum', got {config.grad_method!r}")
        self.params = [p for group in model.task_parameters().values() for p in group]
        self.optimizer = torch.optim.AdamW(decay_groups(self.params, config.weight_decay), lr=config.lr)

    def zero_grad(self):
        # Zeros, never None: AdamW skips a parameter whose grad is None, so a head whose task was
        # not drawn this step would otherwise skip its momentum update after a resume only.
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    def backward(self, task, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def make_gradient_path(model, config):
    return ReferenceGradientPath(model, config)
