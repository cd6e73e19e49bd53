"""The unpadded encoder path (real tokens packed into [T, H]) against the padded reference path,
and the whole encoder with the Triton kernels (interpreted) against the PyTorch path."""
import math

import pytest
import torch

from mtbert import BertConfig, BertModel
from mtbert.model import CPU_UNPAD_MIN_PADDING


def small_config(**changes):
    values = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=160, max_position_embeddings=80, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    values.update(changes)
    return BertConfig(**values)


def right_padded_batch(lengths, vocab_size=97, L=None):
    B, L = len(lengths), L or max(lengths)
    generator = torch.Generator().manual_seed(sum(lengths))
    input_ids = torch.randint(1, vocab_size, (B, L), generator=generator)
    attention_mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()
    token_type_ids = torch.randint(0, 2, (B, L), generator=generator) * attention_mask
    return input_ids * attention_mask, attention_mask, token_type_ids


def run(model, batch, unpad, loss_weights=None):
    """Output and parameter gradients of a loss over the real positions and the pooler."""
    model.unpad = unpad
    model.zero_grad()
    ids, mask, types = batch
    out = model(ids, mask, types)
    keep = mask.bool()
    if loss_weights is not None:
        hidden_w, pooled_w = loss_weights
        ((out.last_hidden_state[keep] * hidden_w).sum() + (out.pooler_output * pooled_w).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def loss_weights_for(model, batch):
    mask = batch[1]
    H = model.config.hidden_size
    return torch.randn(int(mask.sum()), H, device=mask.device), torch.randn(mask.shape[0], H, device=mask.device)


@pytest.mark.parametrize("lengths", [[1, 70, 17], [33], [5, 64, 64, 2], [3, 3, 3]], ids=str)
def test_unpadded_equals_padded(lengths):
    model = BertModel(small_config()).eval()
    batch = right_padded_batch(lengths, L=max(lengths) + 3)  # trailing all-padding columns too
    weights = loss_weights_for(model, batch)
    packed, packed_grads = run(model, batch, unpad=True, loss_weights=weights)
    padded, padded_grads = run(model, batch, unpad=False, loss_weights=weights)
    keep = batch[1].bool()
    torch.testing.assert_close(packed.last_hidden_state[keep], padded.last_hidden_state[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.pooler_output, padded.pooler_output, atol=1e-5, rtol=0)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # Padding positions are zero on the unpadded path (finite, never garbage).
    assert (packed.last_hidden_state[~keep] == 0).all()


@pytest.mark.parametrize("mask_rows", [
    [[0, 1, 1, 1], [1, 1, 1, 0]],  # left padding
    [[1, 0, 1, 1], [1, 1, 0, 0]],  # a hole
    [[1, 1, 1, 1], [0, 0, 0, 0]],  # an empty row
], ids=["left-padded", "hole", "empty-row"])
def test_other_masks_take_the_padded_path(mask_rows):
    model = BertModel(small_config()).eval()
    mask = torch.tensor(mask_rows)
    ids = torch.randint(1, 97, mask.shape)
    model.unpad = True
    default = model(ids, mask)
    model.unpad = False
    torch.testing.assert_close(default.last_hidden_state, model(ids, mask).last_hidden_state, atol=0, rtol=0)
    assert torch.isfinite(default.last_hidden_state).all() and torch.isfinite(default.pooler_output).all()


def test_no_mask_and_full_mask_match_padded():
    model = BertModel(small_config()).eval()
    ids = torch.randint(1, 97, (2, 9))
    model.unpad = False
    reference = model(ids).last_hidden_state
    model.unpad = True
    torch.testing.assert_close(model(ids).last_hidden_state, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids, torch.ones_like(ids)).last_hidden_state, reference, atol=1e-5, rtol=0)


def lengths_with_padding(slots_padded, B=10, L=20):
    """B lengths of at most L whose batch has exactly ``slots_padded`` padding positions."""
    lengths = [L] * B
    for i in range(slots_padded):
        lengths[1 + i % (B - 1)] -= 1  # the first row keeps L
    return lengths


def test_auto_runs_unpadded_on_the_cpu_only_from_the_padding_threshold():
    """unpad="auto" on the CPU: a batch with padding below CPU_UNPAD_MIN_PADDING runs padded (its
    padding positions hold values), one at or above it unpadded (its padding positions are zero);
    both equal the padded path at the real tokens."""
    model = BertModel(small_config()).eval()
    threshold_slots = math.ceil(CPU_UNPAD_MIN_PADDING * 10 * 20)
    for slots, unpadded in ((threshold_slots - 1, False), (threshold_slots, True)):
        batch = right_padded_batch(lengths_with_padding(slots))
        keep = batch[1].bool()
        model.unpad = "auto"
        out = model(*batch).last_hidden_state
        assert bool((out[~keep] == 0).all()) == unpadded, slots
        model.unpad = False
        torch.testing.assert_close(out[keep], model(*batch).last_hidden_state[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", ["yes", None, 2])
def test_unpad_must_be_auto_or_a_bool(value):
    model = BertModel(small_config())
    model.unpad = value
    with pytest.raises(ValueError, match="unpad"):
        model(torch.ones(1, 4, dtype=torch.long))


def test_dropout_identical_to_padded_without_padding():
    """Equal lengths: both paths draw the same random numbers in the same order (hidden dropout
    over [B·L, H] vs [B, L, H]; attention dropout over [B, heads, L, L]), so they agree exactly."""
    model = BertModel(small_config(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)).train()
    batch = right_padded_batch([12, 12, 12])
    torch.manual_seed(7)
    packed, _ = run(model, batch, unpad=True)
    torch.manual_seed(7)
    padded, _ = run(model, batch, unpad=False)
    torch.testing.assert_close(packed.last_hidden_state, padded.last_hidden_state, atol=1e-5, rtol=0)


def test_dropout_statistics_match_padded_with_padding():
    """With padding the paths draw different random numbers but must apply the same dropout:
    deterministic under a seed, and over many draws the same mean and spread per position."""
    model = BertModel(small_config(hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                   hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)).train()
    batch = right_padded_batch([3, 7, 5])
    keep = batch[1].bool()
    torch.manual_seed(3)
    first = run(model, batch, unpad=True)[0].last_hidden_state
    torch.manual_seed(3)
    torch.testing.assert_close(run(model, batch, unpad=True)[0].last_hidden_state, first, atol=0, rtol=0)

    draws = 300
    with torch.no_grad():
        samples = {}
        for unpad in (True, False):
            model.unpad = unpad
            samples[unpad] = torch.stack([model(*batch).last_hidden_state[keep] for _ in range(draws)])
    mean_packed, mean_padded = samples[True].mean(0), samples[False].mean(0)
    standard_error = ((samples[True].var(0) + samples[False].var(0)) / draws).sqrt()
    assert ((mean_packed - mean_padded).abs() <= 5 * standard_error).all()
    spread_ratio = samples[True].var(0).mean() / samples[False].var(0).mean()
    assert 0.85 < spread_ratio < 1.15, spread_ratio


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
def test_encoder_with_triton_kernels_equals_torch_path(monkeypatch, unpad):
    """Every kernel of the encoder interpreted by Triton (attention on the unpadded path, add +
    LayerNorm and bias+GELU on both) against the PyTorch path, outputs and gradients."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors
    model = BertModel(small_config(num_attention_heads=2, hidden_size=64)).eval().to(device)  # head_dim 32
    batch = [t.to(device) for t in right_padded_batch([1, 13, 9])]
    weights = loss_weights_for(model, batch)
    monkeypatch.setenv("MTBERT_KERNELS", "torch")
    expected, expected_grads = run(model, batch, unpad=unpad, loss_weights=weights)
    monkeypatch.setenv("MTBERT_KERNELS", "triton")
    actual, actual_grads = run(model, batch, unpad=unpad, loss_weights=weights)
    keep = batch[1].bool()
    torch.testing.assert_close(actual.last_hidden_state[keep], expected.last_hidden_state[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
def test_cpu_bf16_autocast_close_to_float32(unpad):
    """Under CPU bfloat16 autocast both paths run (bfloat16 matmuls meet float32 LayerNorm and
    GELU parameters and float32 residuals) and stay within bfloat16's precision of float32, with
    float32 parameter gradients; an all-padding row (padded path) stays finite, its mask too."""
    model = BertModel(small_config()).eval()
    batch = right_padded_batch([1, 30, 17, 9])
    if not unpad:
        batch[1][0] = 0  # an empty row: only the padded path takes it
    weights = loss_weights_for(model, batch)
    expected, expected_grads = run(model, batch, unpad=unpad, loss_weights=weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, actual_grads = run(model, batch, unpad=unpad, loss_weights=weights)
    assert actual.last_hidden_state.dtype == torch.float32  # the last LayerNorm's residual is float32
    assert torch.isfinite(actual.last_hidden_state).all() and torch.isfinite(actual.pooler_output).all()
    keep = batch[1].bool()
    torch.testing.assert_close(actual.last_hidden_state[keep], expected.last_hidden_state[keep], atol=5e-2, rtol=0)
    torch.testing.assert_close(actual.pooler_output.float(), expected.pooler_output, atol=3e-2, rtol=0)
    for name, grad in expected_grads.items():
        assert actual_grads[name].dtype == torch.float32, name
        error = (actual_grads[name] - grad).norm() / grad.norm().clamp_min(1e-3)
        assert error < 5e-2, f"{name}: relative gradient error {error:.3f}"
