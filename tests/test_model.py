"""BertModel against the reference implementation, transformers.BertModel (eager attention)."""
import random

import pytest
import torch
import transformers

from mtbert import BertConfig, BertModel
from mtbert.model import hugging_face_named

ATOL = 1e-5
GRAD_RTOL = 1e-4


def hf_model(config: BertConfig) -> transformers.BertModel:
    hf_config = transformers.BertConfig(**config.to_dict(), attn_implementation="eager")
    return transformers.BertModel(hf_config)


def right_padded_batch(config: BertConfig, lengths, generator):
    B, L = len(lengths), max(lengths)
    input_ids = torch.randint(1, config.vocab_size, (B, L), generator=generator)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for row, n in enumerate(lengths):
        attention_mask[row, :n] = 1
    input_ids[attention_mask == 0] = config.pad_token_id
    token_type_ids = torch.randint(0, config.type_vocab_size, (B, L), generator=generator) * attention_mask
    return input_ids, attention_mask, token_type_ids


def random_configs(count=6, seed=1234):
    rng = random.Random(seed)
    configs = []
    for _ in range(count):
        heads = rng.randint(1, 8)
        hidden = rng.choice([h for h in range(32, 257, 8) if h % heads == 0])
        configs.append(BertConfig(
            vocab_size=rng.randint(50, 300), hidden_size=hidden, num_hidden_layers=rng.randint(1, 3),
            num_attention_heads=heads, intermediate_size=rng.choice([2, 4]) * hidden,
            max_position_embeddings=64, type_vocab_size=2,
        ))
    return configs


def assert_outputs_match(ours, theirs, attention_mask):
    keep = attention_mask.bool()
    torch.testing.assert_close(ours.last_hidden_state[keep], theirs.last_hidden_state[keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=ATOL, rtol=0)


def gradients_by_hf_name(model: BertModel) -> dict:
    """Our parameter gradients under Hugging Face's names (the fused QKV split as in the state dict)."""
    return {hf_name: part for name, param in model.named_parameters() if param.grad is not None
            for hf_name, part in hugging_face_named(name, param.grad)}


def assert_gradients_match(ours: BertModel, theirs: transformers.BertModel):
    """Each parameter's gradient within GRAD_RTOL of the reference, relative to its norm. The key
    bias's true gradient is zero (softmax ignores a shift shared by all keys), so what both
    compute there is rounding noise: a floor of 1e-6 of the whole gradient's norm absorbs it."""
    their_grads = {name: p.grad for name, p in theirs.named_parameters() if p.grad is not None}
    our_grads = gradients_by_hf_name(ours)
    assert our_grads.keys() == their_grads.keys()
    floor = 1e-6 * torch.linalg.vector_norm(torch.stack([g.norm() for g in their_grads.values()]))
    for name, reference in their_grads.items():
        error = (our_grads[name] - reference).norm()
        assert error <= GRAD_RTOL * reference.norm() + floor, (
            f"{name}: gradient error {error:.2e}, reference norm {reference.norm():.2e}")


def scalar_loss(output, attention_mask, weights_hidden, weights_pooled):
    keep = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
    return (output.last_hidden_state * keep * weights_hidden).sum() + (output.pooler_output * weights_pooled).sum()


def assert_matches_transformers(ours, theirs, ids, mask, types, generator):
    """Outputs at the real tokens, then the gradients of a random linear function of them."""
    out_ours = ours(ids, mask, types)
    out_theirs = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert_outputs_match(out_ours, out_theirs, mask)

    w_hidden = torch.randn(out_ours.last_hidden_state.shape, generator=generator)
    w_pooled = torch.randn(out_ours.pooler_output.shape, generator=generator)
    scalar_loss(out_ours, mask, w_hidden, w_pooled).backward()
    scalar_loss(out_theirs, mask, w_hidden, w_pooled).backward()
    assert_gradients_match(ours, theirs)


PATHS = {"unpadded": True, "padded": False}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("config", random_configs(), ids=lambda c: f"H{c.hidden_size}-h{c.num_attention_heads}-n{c.num_hidden_layers}")
def test_random_config_matches_transformers(config, path):
    generator = torch.Generator().manual_seed(config.hidden_size)
    ours = BertModel(config).eval()
    ours.unpad = PATHS[path]
    theirs = hf_model(config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ids, mask, types = right_padded_batch(config, [1, 23, 7, 16, 2], generator)
    assert_matches_transformers(ours, theirs, ids, mask, types, generator)


@pytest.mark.parametrize("path", PATHS)
def test_minilm_matches_transformers(minilm_dir, path):
    ours = BertModel.from_pretrained(minilm_dir).eval()
    ours.unpad = PATHS[path]
    theirs = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(0)
    ids, mask, types = right_padded_batch(ours.config, [1, 5, 40, 64, 13, 64], generator)
    ids[:, 0] = 101  # [CLS]
    assert_matches_transformers(ours, theirs, ids, mask, types, generator)


def test_hugging_face_names_split_only_the_fused_projections():
    fused = torch.arange(12.0).reshape(6, 2)
    pairs = hugging_face_named("encoder.layer.3.attention.self.qkv_weight", fused)
    assert [name for name, _ in pairs] == [f"encoder.layer.3.attention.self.{p}.weight" for p in ("query", "key", "value")]
    assert all(torch.equal(part, fused[2 * i:2 * i + 2]) for i, (_, part) in enumerate(pairs))
    assert [name for name, _ in hugging_face_named("qkv_bias", fused[:, 0])] == ["query.bias", "key.bias", "value.bias"]
    assert hugging_face_named("pooler.dense.weight", fused) == [("pooler.dense.weight", fused)]


def test_state_dicts_load_both_ways_strictly():
    config = random_configs(1)[0]
    ours, theirs = BertModel(config), hf_model(config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # the same keys in the same order
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("hidden", [32, 30])  # 30: a projection's size is not a multiple of 16 numbers
def test_seeded_initialisation_equals_transformers(hidden):
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(5)
    ours = BertModel(config)
    torch.manual_seed(5)
    theirs = hf_model(config)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("path", PATHS)
def test_dropout_placement_matches_transformers(path, monkeypatch):
    """With the same RNG state, training-mode outputs agree only if every dropout is applied at
    the same place, to the same shape, in the same order as in Hugging Face. The PyTorch ops
    (MTBERT_KERNELS=torch) draw from torch's stream as Hugging Face does; the fused CPU kernels
    draw their own masks (tests/test_kernels_cpu_dropout.py)."""
    monkeypatch.setenv("MTBERT_KERNELS", "torch")
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32,
                        hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)
    ours = BertModel(config).train()
    ours.unpad = PATHS[path]
    theirs = hf_model(config).train()
    theirs.load_state_dict(ours.state_dict())
    ids, mask, types = right_padded_batch(config, [12, 12, 12], torch.Generator().manual_seed(3))
    torch.manual_seed(42)
    out_ours = ours(ids, mask, types)
    torch.manual_seed(42)
    out_theirs = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert_outputs_match(out_ours, out_theirs, mask)
    torch.manual_seed(43)
    assert not torch.allclose(ours(ids, mask, types).last_hidden_state, out_theirs.last_hidden_state)


def test_output_reads_as_attributes_dict_and_tuple():
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    out = BertModel(config)(torch.randint(0, 50, (2, 5)))
    assert out["last_hidden_state"] is out.last_hidden_state is out[0]
    assert out["pooler_output"] is out.pooler_output is out[1]
    assert out.last_hidden_state.shape == (2, 5, 32) and out.pooler_output.shape == (2, 32)


def test_all_zero_mask_row_is_finite():
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    model = BertModel(config).eval()
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones_like(ids)
    mask[1] = 0
    out = model(ids, mask)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    # The other rows are unaffected by the empty one.
    alone = model(ids[[0, 2]], mask[[0, 2]])
    torch.testing.assert_close(out.pooler_output[[0, 2]], alone.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs, argument", [
    ({"input_ids": torch.tensor([[1, 2, 50]])}, "input_ids"),                       # outside the vocabulary
    ({"input_ids": torch.tensor([[1, -1]])}, "input_ids"),
    ({"input_ids": torch.ones(1, 17, dtype=torch.long)}, "max_position_embeddings"),  # too long
    ({"input_ids": torch.ones(2, 3)}, "input_ids"),                                 # float ids
    ({"input_ids": torch.ones(3, dtype=torch.long)}, "input_ids"),                  # 1-D
    ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}, "attention_mask"),
    ({"input_ids": torch.ones(2, 3, dtype=torch.long), "token_type_ids": torch.ones(2, 4, dtype=torch.long)}, "token_type_ids"),
    ({"input_ids": torch.ones(2, 3, dtype=torch.long), "token_type_ids": torch.full((2, 3), 2)}, "token_type_ids"),
    ({"input_ids": torch.ones(2, 3, dtype=torch.long), "token_type_ids": torch.ones(2, 3)}, "token_type_ids"),
])
def test_bad_input_raises_value_error_naming_the_argument(kwargs, argument):
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    with pytest.raises(ValueError, match=argument):
        BertModel(config)(**kwargs)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="num_attention_heads"):
        BertConfig(hidden_size=30, num_attention_heads=4)
