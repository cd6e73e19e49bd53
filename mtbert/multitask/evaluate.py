"""Evaluation on the dev sets, predictions in the CS224N starter's file format, the summary table."""
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics
from .data import collate

# Header column of each task's prediction file, spelled as the CS224N starter spells it
# (including "Similiary"): its leaderboard reads these files.
PREDICTION_COLUMNS = {"sst": "Predicted_Sentiment", "para": "Predicted_Is_Paraphrase", "sts": "Predicted_Similiary"}


@torch.no_grad()
def head_scores(model, task, examples, tokenizer, batch_size=64, max_length=None, device="cpu", autocast=None,
                progress=False):
    """The head's raw scores (a float32 CPU tensor in the order of ``examples``: [N, 5] logits for
    ``sst``, [N] for the pair tasks) of ``model`` for one task; ``progress`` shows a bar.

    Examples are run in order of length so batches carry little padding."""
    order = sorted(range(len(examples)), key=lambda i: sum(len(t) for t in examples[i].texts))
    pair_mode = model.pair_mode(task)
    was_training = model.training
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(order), batch_size), desc=task, unit="batch", disable=not progress,
                      dynamic_ncols=True):
        batch = collate([examples[i] for i in order[start:start + batch_size]], tokenizer, pair_mode, max_length)
        inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            scores = model(task, inputs)
        chunks.append(scores.float().cpu())
    model.train(was_training)
    ordered = torch.cat(chunks)
    out = torch.empty_like(ordered)
    out[torch.tensor(order)] = ordered
    return out


def predict(model, task, examples, tokenizer, **options):
    """Predictions (a CPU tensor, in the order of ``examples``) of ``model`` for one task: the
    class, 1.0 / 0.0, or the similarity (``model.predict`` of :func:`head_scores`)."""
    return model.predict(task, head_scores(model, task, examples, tokenizer, **options))


def task_metrics(task, predictions, labels) -> dict:
    if task == "sst":
        return {"sst_acc": metrics.accuracy(predictions, labels)}
    if task == "para":
        return {"para_acc": metrics.accuracy(predictions, labels)}
    return {"sts_pearson": metrics.pearson(predictions, labels), "sts_spearman": metrics.spearman(predictions, labels)}


def evaluate(model, dev_sets, tokenizer, predictor=predict, **predict_options):
    """Dev metrics of every task in ``dev_sets`` ({task: TaskFile}) and, when all three are present,
    the overall score. Returns ``(metrics, {task: predictions})``. ``predictor``: a function with
    :func:`predict`'s signature (the trainer's shards the examples over processes)."""
    predictions = {task: predictor(model, task, dev.examples, tokenizer, **predict_options)
                   for task, dev in dev_sets.items()}
    return file_metrics(dev_sets, predictions), predictions


def file_metrics(task_files, predictions) -> dict:
    """The metrics of ``predictions`` ({task: tensor}) on the labeled files of ``task_files``
    ({task: TaskFile}), with the overall score when all three tasks are scored."""
    scores = {}
    for task, task_file in task_files.items():
        if task_file.labeled:
            labels = torch.tensor([e.label for e in task_file.examples])
            scores.update(task_metrics(task, predictions[task], labels))
    if {"sst_acc", "para_acc", "sts_pearson"} <= scores.keys():
        scores["overall"] = metrics.overall_score(scores["sst_acc"], scores["para_acc"], scores["sts_pearson"])
    return scores


def selection_score(scores) -> float:
    """The number best.pt maximises: the overall score when all three tasks are scored, else the
    mean of the scores."""
    return scores.get("overall", sum(scores.values()) / len(scores))


def format_prediction(task, value) -> str:
    if task == "sst":
        return str(int(value))
    if task == "para":
        return f"{float(value):.1f}"
    return f"{float(value):.6g}"


def write_predictions(path, task, ids, predictions) -> Path:
    """Writes ``id \\t <column> `` then ``{id} , {prediction} `` per line, as the starter does."""
    if len(ids) != len(predictions):
        raise ValueError(f"{len(ids)} ids but {len(predictions)} predictions for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"id \t {PREDICTION_COLUMNS[task]} \n")
        for example_id, value in zip(ids, predictions.tolist()):
            f.write(f"{example_id} , {format_prediction(task, value)} \n")
    return path


def summary_table(rows) -> str:
    """A markdown table of dev metrics; ``rows`` is a list of (label, metrics dict)."""
    columns = [("sst_acc", "SST acc"), ("para_acc", "Quora acc"), ("sts_pearson", "STS Pearson"),
               ("sts_spearman", "STS Spearman"), ("overall", "overall")]
    lines = ["| | " + " | ".join(name for _, name in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, values in rows:
        cells = [f"{values[key]:.3f}" if key in values else "–" for key, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
