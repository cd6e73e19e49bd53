"""R-Drop (--rdrop): the trainer's loss and gradient rows equal a plain float64 implementation of
the R-Drop objective on the same two dropout masks; the two passes of a batch do get different
masks; with dropout off the consistency term vanishes (float32 rounding) and the rows are the ordinary step's,
in the packed pass and the per-task passes."""
import copy
import math

import pytest
import torch

from mtbert.multitask import trainer as trainer_module
from mtbert.multitask.data import collate, concat_inputs
from mtbert.multitask.regularization import consistency, rdrop_objective
from mtbert.multitask.trainer import Trainer, TrainConfig

TASKS = ("sst", "para", "sts")


def _trainer(tiny_model_dir, toy_data, out, **overrides):
    settings = dict(data=str(toy_data), out=str(out), model=str(tiny_model_dir), epochs=1, batch_size=4, lr=1e-3,
                    hidden_dropout_prob=0.2, max_length=32, progress=False, para_head="cross", sts_head="cosine",
                    sts_loss="cosine-mse")
    trainer = Trainer(TrainConfig(**{**settings, **overrides}))
    trainer.gradients.step = trainer.scheduler.step = lambda: None  # only the rows are compared
    return trainer


def _batches(trainer, size=4):
    return [collate(trainer.train_sets[task].examples[:size], trainer.tokenizer, trainer.model.pair_mode(task),
                    trainer.config.max_length) for task in TASKS]


def _plain_loss(task, scores, labels):
    if task == "sst":
        return -(scores - scores.exp().sum(-1, keepdim=True).log()).gather(1, labels[:, None]).mean()
    if task == "para":
        p = 1 / (1 + torch.exp(-scores))
        return -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    return ((scores - labels / 5) ** 2).mean()  # cosine-mse


def _plain_divergence(task, a, b):
    """½ (KL(P_a ‖ P_b) + KL(P_b ‖ P_a)) written out; STS (cosine-mse): (a − b)²."""
    if task == "sts":
        return ((a - b) ** 2).mean()
    if task == "para":  # Bernoulli(σ(s)) as two-class probabilities
        p, q = 1 / (1 + torch.exp(-a)), 1 / (1 + torch.exp(-b))
        p, q = torch.stack([1 - p, p], -1), torch.stack([1 - q, q], -1)
    else:
        p, q = a.exp() / a.exp().sum(-1, keepdim=True), b.exp() / b.exp().sum(-1, keepdim=True)
    kl = lambda x, y: (x * (x / y).log()).sum(-1)  # noqa: E731
    return (0.5 * (kl(p, q) + kl(q, p))).mean()


def test_rows_and_losses_equal_the_plain_float64_objective(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    """The packed pass over each batch twice (dropout 0.2) against the formula in float64 with
    autograd per task on the same packed forward (so the same dropout masks: PyTorch's dropout,
    one seed); each task's row must hold the gradient of its own objective only."""
    monkeypatch.setenv("MTBERT_KERNELS", "torch")  # F.dropout: the same masks in float32 and float64
    alpha = 0.7
    trainer = _trainer(tiny_model_dir, toy_data, tmp_path, rdrop=alpha)
    reference = copy.deepcopy(trainer.model).double().train()
    batches = _batches(trainer)
    torch.manual_seed(5)
    losses, _ = trainer.run_step(TASKS, batches)

    torch.manual_seed(5)
    inputs, offsets = concat_inputs([b["inputs"] for b in batches for _ in range(2)])
    scores = reference.forward_packed([t for t in TASKS for _ in range(2)], inputs, offsets)
    params = [p for p in reference.parameters()]
    rows = dict(zip(trainer.gradients.flat.task_names, trainer.gradients.flat.grads))
    for k, (task, batch) in enumerate(zip(TASKS, batches)):
        a, b = scores[2 * k], scores[2 * k + 1]
        labels = batch["labels"] if task == "sst" else batch["labels"].double()
        loss = 0.5 * (_plain_loss(task, a, labels) + _plain_loss(task, b, labels))
        divergence = _plain_divergence(task, a, b)
        assert divergence > 1e-4, task  # the two copies were given different masks (1e-3 to 2e-2 seen)
        assert losses[task] == pytest.approx(loss.item(), rel=1e-5)  # the log keeps the task loss
        grads = torch.autograd.grad(loss + alpha * divergence, params, retain_graph=True, allow_unused=True)
        for (name, p), grad, q in zip(reference.named_parameters(), grads, trainer.model.parameters()):
            begin, end = trainer.gradients.flat.span(q)
            expected = torch.zeros_like(p) if grad is None else grad
            torch.testing.assert_close(rows[task][begin:end].view_as(q).double(), expected, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{task} {name}: {m}")


@pytest.mark.parametrize("passes", ["packed", "per-task"])
def test_without_dropout_the_term_is_zero_and_the_rows_are_the_ordinary_steps(tiny_model_dir, toy_data, tmp_path,
                                                                            monkeypatch, passes):
    divergences = []

    def recording(model, task, scores_a, scores_b, labels, alpha):
        divergences.append(consistency(task, model.sts_loss, scores_a, scores_b).item())
        return rdrop_objective(model, task, scores_a, scores_b, labels, alpha)

    monkeypatch.setattr(trainer_module, "rdrop_objective", recording)
    rows, losses = {}, {}
    for alpha in (0.0, 2.0):
        trainer = _trainer(tiny_model_dir, toy_data, tmp_path / str(alpha), rdrop=alpha, passes=passes)
        trainer.model.eval()  # no dropout anywhere (attention's included)
        losses[alpha], _ = trainer.run_step(TASKS, _batches(trainer))
        rows[alpha] = trainer.gradients.flat.grads.clone()
    # alpha 0 is the ordinary step (no second pass); without dropout the two copies differ only by
    # float32 rounding (their rows sit elsewhere in the packed matrix products): the divergence,
    # quadratic in that difference, is 1e-8 of dropout's.
    assert len(divergences) == 3 and max(divergences) < 1e-12, divergences
    assert losses[2.0] == pytest.approx(losses[0.0], rel=1e-6)
    torch.testing.assert_close(rows[2.0], rows[0.0], rtol=1e-5, atol=1e-7)


def test_objective_formula_and_alpha_zero():
    class Model:
        sts_loss = "ce"

        def loss(self, task, scores, labels):
            return torch.nn.functional.binary_cross_entropy_with_logits(scores, labels / 5)

    a, b, labels = torch.tensor([0.3, -1.0]), torch.tensor([1.1, 0.2]), torch.tensor([4.0, 1.0])
    loss, objective = rdrop_objective(Model(), "sts", a, b, labels, 0.0)
    assert loss.item() == objective.item() == pytest.approx(0.5 * (Model().loss("sts", a, labels) +
                                                                    Model().loss("sts", b, labels)).item())
    _, objective = rdrop_objective(Model(), "sts", a, b, labels, 3.0)  # ce: the Bernoulli divergence
    expected = loss.double() + 3 * _plain_divergence("para", a.double(), b.double())
    assert objective.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not math.isnan(objective.item())


def test_rdrop_must_be_non_negative(tiny_model_dir, toy_data, tmp_path):
    with pytest.raises(ValueError, match="rdrop must be a finite number >= 0"):
        TrainConfig(data=str(toy_data), out=str(tmp_path), rdrop=-0.1)
