"""Heads, losses, predictions, metrics and prediction files against plain implementations of their
formulas (float64, Python loops)."""
import math

import pytest
import torch

import mtbert
from mtbert import BertConfig, BertModel
from mtbert.multitask import heads, losses, metrics
from mtbert.multitask.evaluate import write_predictions
from mtbert.multitask.model import MultitaskBert

B, H = 7, 12


def _reset_linear(module):
    for p in module.parameters():
        torch.nn.init.normal_(p)
    return module


def test_sentiment_head():
    head = _reset_linear(heads.SentimentHead(H, dropout=0.0))
    pooled = torch.randn(B, H)
    expected = pooled.double() @ head.classifier.weight.double().T + head.classifier.bias.double()
    torch.testing.assert_close(head(pooled).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["concat", "sbert"])
def test_linear_pair_heads(kind):
    head = _reset_linear(heads.make_pair_head(kind, H, dropout=0.0))
    u, v = torch.randn(B, H), torch.randn(B, H)
    features = [u, v] + ([(u - v).abs()] if kind == "sbert" else [])
    weight, bias = head.linear.weight.double()[0], head.linear.bias.double()[0]
    expected = torch.stack([sum(f[i].double() @ w for f, w in zip(features, weight.split(H))) + bias
                            for i in range(B)])
    torch.testing.assert_close(head(u, v).double(), expected, rtol=1e-5, atol=1e-5)


def test_cosine_head():
    u, v = torch.randn(B, H), torch.randn(B, H)
    cosine = torch.tensor([float(u[i] @ v[i] / (u[i].norm() * v[i].norm())) for i in range(B)])
    torch.testing.assert_close(heads.CosinePairHead(affine=None)(u, v), cosine, rtol=1e-5, atol=1e-6)
    scaled = heads.CosinePairHead(affine=(3.0, -1.5))
    torch.testing.assert_close(scaled(u, v), 3.0 * cosine - 1.5, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in scaled.parameters()) == 2


def test_cross_head():
    head = _reset_linear(heads.make_pair_head("cross", H, dropout=0.0))
    pooled = torch.randn(B, H)
    expected = pooled.double() @ head.linear.weight.double()[0] + head.linear.bias.double()[0]
    torch.testing.assert_close(head(pooled).double(), expected, rtol=1e-5, atol=1e-5)
    assert head.joint
    with pytest.raises(ValueError, match="pair head"):
        heads.make_pair_head("bilinear", H, 0.0)


def test_dropout_is_applied_in_training_only():
    head = heads.SentimentHead(H, dropout=0.5)
    pooled = torch.randn(64, H)
    assert not torch.equal(head(pooled), head(pooled))
    head.eval()
    assert torch.equal(head(pooled), head(pooled))


# -- losses --------------------------------------------------------------------------------------

def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _bce(logit, target):
    p = _sigmoid(logit)
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_sst_and_para_losses():
    logits, labels = torch.randn(B, 5, dtype=torch.float64), torch.randint(0, 5, (B,))
    expected = sum(-math.log(math.exp(logits[i, labels[i]]) / logits[i].exp().sum()) for i in range(B)) / B
    assert losses.sst_loss(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    scores, targets = torch.randn(B, dtype=torch.float64), torch.randint(0, 2, (B,)).double()
    expected = sum(_bce(scores[i].item(), targets[i].item()) for i in range(B)) / B
    assert losses.para_loss(scores, targets).item() == pytest.approx(expected, rel=1e-12)


def _cosent_by_hand(scores, labels, scale=20.0):
    total = 1.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if labels[i] > labels[j]:
                total += math.exp(scale * (scores[j] - scores[i]))
    return math.log(total)


@pytest.mark.parametrize("kind", losses.STS_LOSSES)
def test_sts_losses(kind):
    scores = torch.rand(B, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0.0, 5.0, 2.4, 2.4, 3.8, 1.0, 4.6], dtype=torch.float64)
    s, y = scores.tolist(), labels.tolist()
    expected = {
        "mse": sum((a - b) ** 2 for a, b in zip(s, y)) / B,
        "ce": sum(_bce(a, b / 5) for a, b in zip(s, y)) / B,
        "cosine-mse": sum((a - b / 5) ** 2 for a, b in zip(s, y)) / B,
        "cosent": _cosent_by_hand(s, y),
    }[kind]
    assert losses.sts_loss(kind, scores, labels).item() == pytest.approx(expected, rel=1e-10)


def test_cosent_is_stable_and_order_only():
    labels = torch.tensor([1.0, 2.0, 3.0])
    wrong_order = losses.cosent_loss(torch.tensor([1.0, 0.0, -1.0]), labels)  # exp(40) terms
    assert torch.isfinite(wrong_order) and wrong_order.item() == pytest.approx(_cosent_by_hand([1, 0, -1], [1, 2, 3]))
    right_order = losses.cosent_loss(torch.tensor([-1.0, 0.0, 1.0]), labels)
    assert right_order.item() < 1e-8
    assert losses.cosent_loss(torch.zeros(3), torch.ones(3)).item() == 0.0  # no ordered pair


def test_sts_predictions_are_on_the_label_scale():
    scores = torch.tensor([-2.0, 0.0, 0.3])
    torch.testing.assert_close(losses.sts_prediction("mse", scores), scores)
    torch.testing.assert_close(losses.sts_prediction("ce", scores), 5 * torch.sigmoid(scores))
    torch.testing.assert_close(losses.sts_prediction("cosent", scores), 5 * scores)
    with pytest.raises(ValueError, match="sts loss"):
        losses.sts_loss("hinge", scores, scores)


# -- the model -----------------------------------------------------------------------------------

def _tiny_encoder():
    return BertModel(BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, max_position_embeddings=32))


def _inputs(rows, length):
    ids = torch.randint(1, 50, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("head", heads.PAIR_HEADS)
def test_multitask_model_pair_scores(head):
    model = MultitaskBert(_tiny_encoder(), para_head=head, sts_head=head, dropout=0.0).eval()
    joint = model.pair_mode("para") == "joint"
    assert joint == (head == "cross")
    inputs = _inputs(B if joint else 2 * B, 9)
    scores = model("para", inputs)
    assert scores.shape == (B,)
    hidden = model.encoder(**inputs).last_hidden_state
    mask = inputs["attention_mask"].double().unsqueeze(-1)
    pooled = (hidden.double() * mask).sum(1) / mask.sum(1)  # mean pooling by hand
    head_module = model.heads["para"]
    if joint:
        expected = head_module(pooled.float())
    else:
        expected = head_module(pooled[:B].float(), pooled[B:].float())
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_multitask_model_sst_cls_pooling_and_predictions():
    """"cls" is the raw [CLS] vector, "pooler" BERT's tanh(W·[CLS]), as in mtbert.encode."""
    model = MultitaskBert(_tiny_encoder(), pooling="cls", dropout=0.0).eval()
    inputs = _inputs(B, 6)
    logits = model("sst", inputs)
    output = model.encoder(**inputs)
    torch.testing.assert_close(logits, model.heads["sst"](output.last_hidden_state[:, 0]))
    model.pooling = "pooler"
    torch.testing.assert_close(model("sst", inputs), model.heads["sst"](output.pooler_output))
    assert model.predict("sst", logits).tolist() == logits.argmax(-1).tolist()
    assert model.predict("para", torch.tensor([-0.1, 0.0, 2.0])).tolist() == [0.0, 0.0, 1.0]
    groups = model.task_parameters()
    assert list(groups) == ["shared", "sst", "para", "sts"]
    assert sum(p.numel() for g in groups.values() for p in g) == sum(p.numel() for p in model.parameters())
    model.freeze_encoder()
    assert model.task_parameters()["shared"] == []


def test_multitask_model_bad_options():
    with pytest.raises(ValueError, match="sts_head"):
        MultitaskBert(_tiny_encoder(), sts_head="dot")
    with pytest.raises(ValueError, match="pooling"):
        MultitaskBert(_tiny_encoder(), pooling="max")


def test_importable_from_package():
    assert mtbert.MultitaskBert is MultitaskBert


# -- metrics -------------------------------------------------------------------------------------

def _pearson_by_hand(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _average_ranks(values):
    ranks = [0.0] * len(values)
    for i, v in enumerate(values):
        below = sum(1 for w in values if w < v)
        ties = sum(1 for w in values if w == v)
        ranks[i] = below + (ties + 1) / 2
    return ranks


def test_correlations_match_plain_formulas():
    x = torch.randn(50, dtype=torch.float64)
    y = 0.3 * x + torch.randn(50, dtype=torch.float64)
    y[:10] = 1.0  # ties
    x[5:15] = x[5]
    assert metrics.pearson(x, y) == pytest.approx(_pearson_by_hand(x.tolist(), y.tolist()), rel=1e-12)
    expected = _pearson_by_hand(_average_ranks(x.tolist()), _average_ranks(y.tolist()))
    assert metrics.spearman(x, y) == pytest.approx(expected, rel=1e-12)
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert math.isnan(metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_accuracy_and_overall():
    assert metrics.accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
    assert metrics.accuracy(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == 0.5
    assert metrics.overall_score(0.5, 0.8, 0.7) == pytest.approx((0.5 + 0.8 + 0.85) / 3)
    with pytest.raises(ValueError, match="same non-empty shape"):
        metrics.accuracy(torch.tensor([1, 2]), torch.tensor([1]))


# -- prediction files ----------------------------------------------------------------------------

@pytest.mark.parametrize("task,values,column,lines", [
    ("sst", torch.tensor([3, 0]), "Predicted_Sentiment", ["a1 , 3 ", "b2 , 0 "]),
    ("para", torch.tensor([1.0, 0.0]), "Predicted_Is_Paraphrase", ["a1 , 1.0 ", "b2 , 0.0 "]),
    ("sts", torch.tensor([4.25, 0.125]), "Predicted_Similiary", ["a1 , 4.25 ", "b2 , 0.125 "]),
])
def test_prediction_file_format(tmp_path, task, values, column, lines):
    path = write_predictions(tmp_path / "out" / f"{task}-dev-output.csv", task, ["a1", "b2"], values)
    # The CS224N starter's exact layout: f"id \t {column} \n", then f"{id} , {prediction} \n".
    assert path.read_text(encoding="utf-8") == f"id \t {column} \n" + "".join(line + "\n" for line in lines)
    with pytest.raises(ValueError, match="2 ids but 1 predictions"):
        write_predictions(path, task, ["a1", "b2"], values[:1])
