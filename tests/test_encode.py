"""Sentence embeddings: pooling formulas and the quality all-MiniLM-L6-v2 is known to reach."""
import csv

import torch

from mtbert import BertConfig, BertModel, Tokenizer, encode
from mtbert.encode import mean_pool


def pearson(x, y):
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def test_mean_pool_averages_only_real_tokens():
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    assert torch.equal(pooled[2], torch.zeros(4, dtype=torch.float64))


def test_encode_keeps_input_order_and_normalizes(minilm_dir):
    sentences = ["a much longer sentence about the weather today", "hi", "the cat sat on the mat"]
    together = encode(sentences, model=minilm_dir, batch_size=2)
    one_by_one = torch.cat([encode([s], model=minilm_dir) for s in sentences])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(3), atol=1e-6, rtol=0)


def test_encode_cls_pooling_without_normalization(minilm_dir):
    model, tokenizer = BertModel.from_pretrained(minilm_dir).eval(), Tokenizer.from_pretrained(minilm_dir)
    got = encode(["one sentence", "and another"], model=model, pooling="cls", normalize=False)
    with torch.no_grad():
        output = model(**tokenizer(["one sentence", "and another"]))
    torch.testing.assert_close(got, output.last_hidden_state[:, 0], atol=1e-5, rtol=0)
    pooler = encode(["one sentence", "and another"], model=model, pooling="pooler", normalize=False)
    torch.testing.assert_close(pooler, output.pooler_output, atol=1e-5, rtol=0)


def test_encode_needs_a_tokenizer_for_an_unloaded_model():
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    try:
        encode(["x"], model=BertModel(config))
    except ValueError as err:
        assert "tokenizer" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_minilm_sts_dev_pearson(data_dir, bundled_minilm_dir):
    """Cosine similarity of mean-pooled all-MiniLM-L6-v2 embeddings against the STS-B gold
    scores: the model gives r = 0.838 on this set (mean pooling), so anything below 0.83 is a bug."""
    with open(data_dir / "sts-dev.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r.get("similarity") not in (None, "")]
    first = encode([r["sentence1"] for r in rows], model=bundled_minilm_dir)
    second = encode([r["sentence2"] for r in rows], model=bundled_minilm_dir)
    r = pearson((first * second).sum(-1), torch.tensor([float(row["similarity"]) for row in rows]))
    assert r >= 0.83, f"Pearson r = {r:.4f}"
