"""The seed of a dropout op: a CPU int64 tensor drawn outside the op, so the op stays a pure function
of its inputs (what torch.compile and the backward need) and torch.manual_seed fixes its masks."""
import torch


def seed_tensor(seed, dropout_p):
    """A dropout op's seed: ``seed`` as a tensor, else drawn from the CPU generator (seeded by
    torch.manual_seed, no GPU sync) when there is dropout."""
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    return torch.tensor(seed, dtype=torch.int64)
