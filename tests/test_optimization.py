"""The learning-rate levers of the multitask optimizer (--layer-lr-decay, --head-lr): each
parameter's first AdamW step equals the plain single-tensor AdamW in float64 at the rate the
formula gives it, and without the levers the groups are the plain decay groups."""
import warnings

import pytest
import torch

from mtbert.multitask.optimization import decay_groups
from mtbert.multitask.trainer import Trainer, TrainConfig
from mtbert.optim.adamw import adamw_reference


def _trainer(tiny_model_dir, toy_data, tmp_path, **overrides):
    settings = dict(data=str(toy_data), out=str(tmp_path), model=str(tiny_model_dir), epochs=1, batch_size=8,
                    lr=1e-3, hidden_dropout_prob=0.0, max_length=32, progress=False, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(TrainConfig(**{**settings, **overrides}))


def _expected_rate(name, lr, decay, head_lr, layers=2):
    """The rate the flags promise, spelled out per parameter name (the tiny encoder has 2 layers)."""
    if name.startswith("heads."):
        return head_lr
    if name.startswith("encoder.embeddings."):
        return lr * decay ** layers
    if name.startswith("encoder.encoder.layer."):
        return lr * decay ** (layers - 1 - int(name.split(".")[3]))
    return lr  # the pooler, above the top layer


def test_layer_decay_and_head_rate_reach_each_parameters_first_step(tiny_model_dir, toy_data, tmp_path):
    lr, decay, head_lr = 1e-3, 0.5, 2e-2
    trainer = _trainer(tiny_model_dir, toy_data, tmp_path, layer_lr_decay=decay, head_lr=head_lr)
    named = dict(trainer.model.named_parameters())
    before = {name: p.detach().double().clone() for name, p in named.items()}
    trainer.train_step(["sst", "para", "sts"])
    decays = {id(p) for group in decay_groups(named.values(), 0.01) if group["weight_decay"] for p in group["params"]}
    for name, p in named.items():
        if p.grad is None or not p.grad.any():
            continue
        expected = before[name].clone()
        adamw_reference(expected, p.grad.double(), torch.zeros_like(expected), torch.zeros_like(expected), 1,
                        lr=_expected_rate(name, lr, decay, head_lr), weight_decay=0.01 if id(p) in decays else 0.0)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_without_levers_the_groups_are_the_decay_groups(tiny_model_dir, toy_data, tmp_path):
    trainer = _trainer(tiny_model_dir, toy_data, tmp_path)
    plain = decay_groups(trainer.gradients.flat.parameters(), 0.01)
    groups = trainer.optimizer.param_groups
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in plain]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.01), (1e-3, 0.0)]


@pytest.mark.parametrize("settings, message", [({"layer_lr_decay": 0.0}, "layer_lr_decay must be in"),
                                               ({"layer_lr_decay": 1.5}, "layer_lr_decay must be in"),
                                               ({"head_lr": -1.0}, "head_lr must be a positive")])
def test_bad_lever_values_are_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)
