"""mtbert-predict and the export, against independent references: the trainer's own dev
predictions and metrics for the same best.pt, and transformers' BertModel loading the exported
encoder."""
import json
import warnings

import pytest
import torch

from mtbert import BertModel
from mtbert.data import DEFAULT_FILES, load_task_file
from mtbert.multitask.checkpoint import load_checkpoint
from mtbert.multitask.model import MultitaskBert
from mtbert.multitask.trainer import Trainer, TrainConfig
from mtbert.predict import Predictor
from mtbert.predict import main as predict_main

TASK_FLAGS = {"sst": "--sst", "para": "--para", "sts": "--sts"}


@pytest.fixture(scope="module")
def run(tiny_model_dir, toy_data, tmp_path_factory):
    """A finished two-epoch run on the toy data: best.pt, its dev predictions and final metrics, and
    the model of every evaluation (every 3 steps and each epoch's end) in checkpoints/."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(data=str(toy_data), out=str(out), model=str(tiny_model_dir), epochs=2, batch_size=16,
                         lr=3e-3, hidden_dropout_prob=0.1, max_length=32, progress=False, para_head="cross",
                         sts_head="cosine", sts_loss="cosine-mse", eval_every=3, keep_checkpoints=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(config).fit()
    return out


@pytest.fixture(scope="module")
def other_seed_run(tiny_model_dir, toy_data, tmp_path_factory):
    """The same run with another seed: a second ensemble member."""
    out = tmp_path_factory.mktemp("run-seed-1")
    config = TrainConfig(data=str(toy_data), out=str(out), model=str(tiny_model_dir), epochs=1, batch_size=16,
                         lr=3e-3, hidden_dropout_prob=0.1, max_length=32, progress=False, para_head="cross",
                         sts_head="cosine", sts_loss="cosine-mse", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(config).fit()
    return out


def _final(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "final")


def _dev_files(toy_data):
    return {task: toy_data / DEFAULT_FILES[(task, "dev")] for task in TASK_FLAGS}


def test_cli_predictions_and_metrics_equal_the_trainers(run, toy_data, tmp_path, capsys):
    files = _dev_files(toy_data)
    argv = ["--checkpoint", str(run / "best.pt"), "--out", str(tmp_path)]
    for task, flag in TASK_FLAGS.items():
        argv += [flag, str(files[task])]
    assert predict_main(argv) == 0
    for task, path in files.items():
        ours = (tmp_path / f"{path.stem}-output.csv").read_text(encoding="utf-8")
        assert ours == (run / "predictions" / f"{task}-dev-output.csv").read_text(encoding="utf-8"), task
    final = _final(run)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {k: v for k, v in final.items() if k in metrics} and "overall" in metrics
    assert "| SST acc |" in capsys.readouterr().out


def test_unlabeled_file_gets_predictions_and_no_metrics(run, toy_data, tmp_path):
    test_file = toy_data / DEFAULT_FILES[("sts", "test")]
    assert predict_main(["--checkpoint", str(run / "best.pt"), "--sts", str(test_file), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sts-test-student-output.csv").read_text(encoding="utf-8") == \
        (run / "predictions" / "sts-test-output.csv").read_text(encoding="utf-8")
    assert not (tmp_path / "metrics.json").exists()


def test_python_predict_equals_the_file_predictions(run, toy_data):
    predictor = Predictor.load(run / "best.pt")
    for task, path in _dev_files(toy_data).items():
        examples = load_task_file(task, path).examples
        texts = [e.texts[0] if task == "sst" else e.texts for e in examples]
        lines = (run / "predictions" / f"{task}-dev-output.csv").read_text(encoding="utf-8").splitlines()[1:]
        expected = {line.split(" , ")[0]: float(line.split(" , ")[1]) for line in lines}
        predicted = predictor.predict(task, texts)
        torch.testing.assert_close(predicted.double(), torch.tensor([expected[e.id] for e in examples],
                                                                    dtype=torch.float64), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"texts\[0\] must be a \(sentence1, sentence2\) pair"):
        predictor.predict("para", ["a lone sentence"])
    with pytest.raises(ValueError, match="task must be one of"):
        predictor.predict("nli", ["x"])


def test_export_loads_in_transformers_and_mtbert_with_the_trained_hidden_states(run, toy_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    export = tmp_path / "export"
    assert predict_main(["--checkpoint", str(run / "best.pt"), "--export", str(export)]) == 0
    # The reference: the trained weights straight from best.pt, in a model built from its config.
    state = load_checkpoint(run / "best.pt")
    trained = MultitaskBert(BertModel.from_pretrained(state["config"]["model"]), para_head="cross",
                            sts_head="cosine", sts_loss="cosine-mse")
    trained.load_state_dict(state["model"])
    trained.eval()
    predictor = Predictor.load(export)
    batch = predictor.tokenizer(["the film likes the river .", "a dog reads"], ["a movie", "a dog reads a song ."])
    with torch.no_grad():
        expected = trained.encoder(**batch).last_hidden_state
        theirs = transformers.BertModel.from_pretrained(export).eval()(**batch).last_hidden_state
        ours = BertModel.from_pretrained(export).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(theirs[mask], expected[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[mask], expected[mask], rtol=1e-5, atol=1e-5)
    # The heads came along: the export predicts what the checkpoint predicts.
    from_checkpoint = Predictor.load(run / "best.pt")
    dev = load_task_file("sts", toy_data / DEFAULT_FILES[("sts", "dev")]).examples
    pairs = [e.texts for e in dev]
    torch.testing.assert_close(predictor.predict("sts", pairs), from_checkpoint.predict("sts", pairs))


def _error(capsys, argv):
    status = predict_main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


def test_foreign_checkpoint_and_wrong_columns_are_one_line_errors(run, toy_data, tmp_path, capsys):
    foreign = tmp_path / "pytorch_model.bin"
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2, 2)}, foreign)
    status, errors = _error(capsys, ["--checkpoint", str(foreign), "--export", str(tmp_path / "e")])
    assert status == 2 and len(errors) == 1 and errors[0].startswith("mtbert-predict: error: --checkpoint: ")
    assert "not a checkpoint of mtbert-train" in errors[0]
    sts_file = toy_data / DEFAULT_FILES[("sts", "dev")]
    status, errors = _error(capsys, ["--checkpoint", str(run / "best.pt"), "--sst", str(sts_file),
                                     "--out", str(tmp_path / "p")])
    assert status == 2 and len(errors) == 1 and errors[0].startswith("mtbert-predict: error: --sst: ")
    assert "missing column(s) ['sentence']" in errors[0]
    status, errors = _error(capsys, ["--checkpoint", str(run / "best.pt"), "--sst", str(sts_file)])
    assert status == 2 and "--out DIR is required" in errors[0]


def _scores_of(checkpoint, task, examples):
    """One model's head scores, straight from best.pt's weights: one padded batch, file order."""
    from mtbert import Tokenizer

    state = load_checkpoint(checkpoint)
    model = MultitaskBert(BertModel.from_pretrained(state["config"]["model"]), para_head="cross",
                          sts_head="cosine", sts_loss="cosine-mse")
    model.load_state_dict(state["model"])
    tokenizer = Tokenizer.from_pretrained(state["config"]["model"])
    if task == "sst":
        inputs = tokenizer([e.texts[0] for e in examples], max_length=32)
    elif task == "para":  # the cross head: pairs encoded together
        inputs = tokenizer([e.texts[0] for e in examples], [e.texts[1] for e in examples], max_length=32)
    else:  # the cosine head: first sentences, then second ones
        inputs = tokenizer([e.texts[0] for e in examples] + [e.texts[1] for e in examples], max_length=32)
    with torch.no_grad():
        return model.eval()(task, inputs), model


def test_ensemble_averages_the_members_head_scores(run, other_seed_run, toy_data, tmp_path):
    files = _dev_files(toy_data)
    argv = ["--checkpoint", str(run / "best.pt"), str(other_seed_run / "best.pt"), "--out", str(tmp_path)]
    for task, flag in TASK_FLAGS.items():
        argv += [flag, str(files[task])]
    assert predict_main(argv) == 0
    disagreements = 0
    for task, path in files.items():
        examples = load_task_file(task, path).examples
        first, model = _scores_of(run / "best.pt", task, examples)
        second, _ = _scores_of(other_seed_run / "best.pt", task, examples)
        expected = model.predict(task, (first + second) / 2)
        lines = (tmp_path / f"{path.stem}-output.csv").read_text(encoding="utf-8").splitlines()[1:]
        ours = torch.tensor([float(line.split(" , ")[1]) for line in lines], dtype=torch.float64)
        torch.testing.assert_close(ours, expected.double(), rtol=0, atol=1e-5)
        disagreements += int((model.predict(task, first) != model.predict(task, second)).sum())
    assert disagreements > 0  # the members differ, so the average is not one member's prediction
    assert predict_main(["--checkpoint", str(run / "best.pt"), str(other_seed_run / "best.pt"),
                         "--export", str(tmp_path / "e")]) == 2
    # Both seeds held out the same validation rows (--val-seed), so the ensemble can be scored on them.
    assert predict_main(["--checkpoint", str(run / "best.pt"), str(other_seed_run / "best.pt"), "--validation",
                         "--out", str(tmp_path / "v")]) == 0
    assert "overall" in json.loads((tmp_path / "v" / "validation-metrics.json").read_text())


def test_validation_scores_of_best_pt_equal_the_trainers(run, tmp_path, capsys):
    assert predict_main(["--checkpoint", str(run / "best.pt"), "--validation", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "validation-metrics.json").read_text()) == load_checkpoint(run / "best.pt")["scores"]
    assert "validation split:" in capsys.readouterr().out
    assert predict_main(["--checkpoint", str(run / "best.pt"), "--export", str(tmp_path / "x")]) == 0
    status, errors = _error(capsys, ["--checkpoint", str(tmp_path / "x"), "--validation"])
    assert status == 2 and "is an exported model" in errors[0]


def test_average_weights_is_the_mean_of_the_kept_checkpoints(run, toy_data, tmp_path):
    kept = sorted((run / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    val_steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "val"]
    assert [int(p.stem.split("-")[1]) for p in kept] == val_steps and len(kept) >= 3
    last_three = kept[-3:]
    export = tmp_path / "averaged"
    argv = ["--checkpoint", *map(str, last_three), "--average-weights", "--export", str(export),
            "--sts", str(toy_data / DEFAULT_FILES[("sts", "dev")]), "--out", str(tmp_path / "p")]
    assert predict_main(argv) == 0
    states = [load_checkpoint(p)["model"] for p in last_three]
    averaged = Predictor.load(export)
    for name, value in averaged.model.state_dict().items():
        mean = sum(state[name].double() for state in states) / 3
        torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-6, msg=name)
    examples = load_task_file("sts", toy_data / DEFAULT_FILES[("sts", "dev")]).examples
    lines = (tmp_path / "p" / "sts-dev-output.csv").read_text(encoding="utf-8").splitlines()[1:]
    written = torch.tensor([float(line.split(" , ")[1]) for line in lines])
    torch.testing.assert_close(written, averaged.predict("sts", [e.texts for e in examples]), rtol=0, atol=1e-5)


def test_bf16_predictions_equal_a_bf16_runs_own(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MTBERT_FORCE_CPU_BF16", "1")
    out = tmp_path / "run"
    config = TrainConfig(data=str(toy_data), out=str(out), model=str(tiny_model_dir), epochs=1, batch_size=16,
                         lr=3e-3, max_length=32, progress=False, bf16=True, tasks=("sts",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(config).fit()
    dev = toy_data / DEFAULT_FILES[("sts", "dev")]
    expected = (out / "predictions" / "sts-dev-output.csv").read_text(encoding="utf-8")
    for flags, equal in ((["--bf16"], True), ([], False)):
        assert predict_main(["--checkpoint", str(out / "best.pt"), "--sts", str(dev), "--out", str(tmp_path / "p"),
                             *flags]) == 0
        assert ((tmp_path / "p" / "sts-dev-output.csv").read_text(encoding="utf-8") == expected) == equal, flags
