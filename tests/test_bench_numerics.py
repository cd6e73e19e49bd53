"""The multitask benchmark's stacks and its numerics check (benchmarks/stacks.py), on a tiny model:
the competent stack's Gram-matrix PCGrad equals the plain per-pair PCGrad and mtbert's C++ op, the
competent stack and mtbert's step train identically, and the check fails on a wrong combination."""
import math

import pytest
import torch
import transformers

from benchmark_scripts import load_benchmark_script
from mtbert import BertConfig, BertModel
from mtbert.multitask.model import MultitaskBert
from mtbert.optim import combine_gradients, combine_reference, pcgrad_orders

stacks = load_benchmark_script("stacks")

TINY = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32)
BATCH = 6


def conflicting_gradients(K, P, generator):
    """Random [K, P] rows where row 1 points against row 0 (cosine about -0.5)."""
    grads = torch.randn(K, P, generator=generator)
    grads[1] = -0.5 * grads[0] + 0.5 * grads[1]
    return grads


@pytest.mark.parametrize("K", [2, 3, 5])
def test_gram_pcgrad_matches_per_pair_reference_and_extension(K):
    generator = torch.Generator().manual_seed(K)
    grads = conflicting_gradients(K, 1000, generator)
    orders = pcgrad_orders(K, generator)
    expected = combine_reference(grads, "pcgrad", orders=orders)  # float64, per pair on the vectors
    assert not torch.allclose(expected, grads.double().sum(0), rtol=1e-2)  # the surgery did something
    torch.testing.assert_close(stacks.gram_pcgrad(grads, orders).double(), expected, rtol=1e-5, atol=1e-5)
    out = torch.empty(1000)
    combine_gradients(grads, out, "pcgrad", orders=orders)
    torch.testing.assert_close(stacks.gram_pcgrad(grads, orders), out, rtol=1e-5, atol=1e-5)


def test_float64_gram_pcgrad_matches_the_per_pair_reference_across_scales():
    """The numerics check's reference, with task gradients 1e4 apart in size (as the STS gradient
    of a random-init MiniLM dwarfs Quora's): its Gram, accumulated in float64 a chunk at a time, is
    the exact one, and its combination matches the per-pair float64 PCGrad to 1e-7 (the float32
    Gram's combination was 5e-7 off here, measured)."""
    generator = torch.Generator().manual_seed(7)
    grads = conflicting_gradients(3, 2_000_000, generator)
    grads[1] *= 1e-2
    grads[2] *= 1e2
    orders = pcgrad_orders(3, generator)
    torch.testing.assert_close(stacks.float64_gram(grads, chunk=65_536), grads.double() @ grads.double().T,
                               rtol=1e-12, atol=0)
    expected = combine_reference(grads, "pcgrad", orders=orders)  # float64, per pair on the vectors
    combined = stacks.float64_gram_pcgrad(grads, orders).double()
    assert float((combined - expected).norm() / expected.norm()) < 1e-7


def tiny_models():
    """The same tiny weights as mtbert's encoder and as transformers', identical fresh heads."""
    torch.manual_seed(0)
    ours = BertModel(TINY)
    theirs = transformers.BertModel(transformers.BertConfig(**TINY.to_dict(), attn_implementation="sdpa"))
    theirs.load_state_dict(ours.state_dict())
    models = []
    for encoder in (theirs, ours):
        torch.manual_seed(1)
        models.append(MultitaskBert(encoder, para_head="sbert", sts_head="sbert", sts_loss="mse", dropout=0.0).train())
    return models


def tiny_batches(steps):
    """``steps`` dicts of task batches: right-padded random tokens, pairs as 2B rows."""
    generator = torch.Generator().manual_seed(2)
    out = []
    for _ in range(steps):
        batches = {}
        for task in stacks.TASKS:
            rows = BATCH if task == "sst" else 2 * BATCH
            lengths = torch.randint(3, 12, (rows,), generator=generator)
            mask = (torch.arange(12) < lengths[:, None]).long()
            ids = torch.randint(1, TINY.vocab_size, (rows, 12), generator=generator) * mask
            inputs = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}
            labels = {"sst": torch.randint(0, 5, (BATCH,), generator=generator),
                      "para": torch.randint(0, 2, (BATCH,), generator=generator).float(),
                      "sts": 5 * torch.rand(BATCH, generator=generator)}[task]
            batches[task] = {"inputs": inputs, "labels": labels}
        out.append(batches)
    return out


ORDERS = [[1, 2], [2, 0], [0, 1]]


@pytest.mark.parametrize("mtbert_step", ["MtbertStep", "MtbertPackedStep"])
def test_competent_and_mtbert_steps_train_identically(mtbert_step):
    competent_model, mtbert_model = tiny_models()
    errors = stacks.check_same_training(stacks.CompetentStep(competent_model, ORDERS),
                                        getattr(stacks, mtbert_step)(mtbert_model, ORDERS), tiny_batches(3))
    assert len(errors["gradients"]) == 3 and max(errors["gradients"]) < stacks.GRADIENT_RTOL
    assert errors["update"] < stacks.UPDATE_RTOL


def test_check_fails_on_sum_instead_of_pcgrad():
    reference, candidate = tiny_models()
    wrong = stacks.CompetentStep(candidate, ORDERS, combination=stacks.sum_combination)
    with pytest.raises(AssertionError, match="step 1: the combined gradients differ"):
        stacks.check_same_training(stacks.CompetentStep(reference, ORDERS), wrong, tiny_batches(3))


def test_parameter_check_alone_fails_on_sum_instead_of_pcgrad():
    """The check on the parameters after 3 steps is not a sign check: with the gradient check
    switched off, it still catches the wrong combination."""
    reference, candidate = tiny_models()
    wrong = stacks.CompetentStep(candidate, ORDERS, combination=stacks.sum_combination)
    with pytest.raises(AssertionError, match="after 3 steps the parameter changes differ"):
        stacks.check_same_training(stacks.CompetentStep(reference, ORDERS), wrong, tiny_batches(3),
                                   gradient_rtol=math.inf)


def test_check_rejects_different_starting_weights():
    reference, candidate = tiny_models()
    with torch.no_grad():
        next(candidate.heads["sst"].parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="same weights"):
        stacks.check_same_training(stacks.CompetentStep(reference, ORDERS), stacks.MtbertStep(candidate, ORDERS),
                                   tiny_batches(1))
