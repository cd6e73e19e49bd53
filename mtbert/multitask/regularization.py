"""R-Drop (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks"): every batch goes
through the model twice, with two different dropout masks, and the training objective adds a
consistency term between the two predictions:

    objective = (L(s₁) + L(s₂)) / 2 + α · D(s₁, s₂)

with L the task loss and D the symmetric divergence of the two predictive distributions,
D = ½ (KL(P₁ ‖ P₂) + KL(P₂ ‖ P₁)), the paper's L_KL (its task term is the sum of the two losses; we
take their mean so that α = 0 is exactly the ordinary loss):

- SST: P = softmax of the 5 logits;
- paraphrase, and STS under ``--sts-loss ce``: P = Bernoulli(σ(logit)), i.e. the softmax of the
  two logits (0, s);
- STS regressed by ``mse``, ``cosine-mse`` or ranked by ``cosent``: no distribution, so D is the
  squared difference (s₁ − s₂)² of the two scores, the paper's choice for its regression task
  (STS-B), on the scale the loss regresses (0–5 for mse, the cosine for cosine-mse).

Each D is a mean over the batch's examples, as the task losses are."""
import torch
import torch.nn.functional as F


def symmetric_kl(logits_a, logits_b):
    """½ (KL(P_a ‖ P_b) + KL(P_b ‖ P_a)) of the categorical distributions softmax(logits) over the
    last dimension, averaged over the others. Equal to ½ Σ_c (p_a − p_b)(log p_a − log p_b)."""
    log_p, log_q = F.log_softmax(logits_a, dim=-1), F.log_softmax(logits_b, dim=-1)
    return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1).mean()


def consistency(task, sts_loss, scores_a, scores_b):
    """The R-Drop divergence D between the head's scores of two passes over the same batch (see
    the module docstring): [B, 5] logits for ``sst``, [B] for the pair tasks."""
    if task == "sst":
        return symmetric_kl(scores_a, scores_b)
    if task == "para" or sts_loss == "ce":
        # Bernoulli(σ(s)) is the softmax of the two logits (0, s).
        return symmetric_kl(F.pad(scores_a[:, None], (1, 0)), F.pad(scores_b[:, None], (1, 0)))
    return (scores_a - scores_b).square().mean()


def rdrop_objective(model, task, scores_a, scores_b, labels, alpha):
    """(task loss, objective) of one task batch whose head scores of two dropout passes are
    ``scores_a`` and ``scores_b``: the mean of the two task losses (what the trainer logs), and
    that plus ``alpha`` times :func:`consistency` (what it back-propagates)."""
    loss = 0.5 * (model.loss(task, scores_a, labels) + model.loss(task, scores_b, labels))
    if alpha == 0:
        return loss, loss
    return loss, loss + alpha * consistency(task, model.sts_loss, scores_a, scores_b)

