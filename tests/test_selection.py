"""Honest selection: the validation split carved from the training files, best.pt chosen on it
(also mid-epoch with --eval-every), dev scored once for the final model; --select-on dev keeps the
CS224N habit; the plot draws the selection metrics against steps with the chosen point marked."""
import json
import warnings

import pytest

from mtbert.data import DEFAULT_FILES, load_task_file
from mtbert.errors import ConfigError
from mtbert.multitask import evaluate as evaluation
from mtbert.multitask.checkpoint import load_checkpoint
from mtbert.multitask.data import split_validation
from mtbert.multitask.plot import selection_curves
from mtbert.multitask.predictor import Predictor
from mtbert.multitask.trainer import Trainer, TrainConfig
from mtbert.train import config_for_resume


def _config(tiny_model_dir, toy_data, out, **overrides):
    settings = dict(data=str(toy_data), out=str(out), model=str(tiny_model_dir), epochs=1, batch_size=16,
                    lr=3e-3, hidden_dropout_prob=0.1, max_length=32, progress=False, log_every=2)
    return TrainConfig(**{**settings, **overrides})


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _fit(config):
    trainer = Trainer(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer, trainer.fit()


@pytest.mark.parametrize("n, fraction", [(2, 0.1), (7, 0.5), (96, 0.1), (1000, 0.25)])
def test_validation_split_partitions_the_rows_seeded(n, fraction):
    rows = list(range(n))
    train, val = split_validation(rows, fraction, seed=3, name="sst-train")
    assert sorted(train + val) == rows and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # file order kept
    assert len(val) == max(1, round(fraction * n))
    assert split_validation(rows, fraction, seed=3, name="sst-train") == (train, val)
    if n >= 96:  # another seed, another draw
        assert split_validation(rows, fraction, seed=4, name="sst-train")[1] != val
    assert split_validation(rows, 0.0, seed=3) == (rows, [])


def test_validation_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fraction must be in"):
        split_validation(list(range(10)), 1.0, seed=0)
    with pytest.raises(ValueError, match="too few"):
        split_validation([1], 0.5, seed=0)


def test_selection_flags_are_checked():
    assert TrainConfig().val_fraction == 0.1 and TrainConfig(select_on="dev").val_fraction == 0.0
    for settings, message in (({"val_fraction": 0.0}, "no validation split"),
                              ({"select_on": "dev", "val_fraction": 0.2}, "never use them"),
                              ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
                              ({"select_on": "test"}, "select_on must be one of"),
                              ({"eval_every": -1}, "eval_every must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**settings)


def test_best_checkpoint_is_chosen_on_validation_and_dev_is_scored_once(tiny_model_dir, toy_data, tmp_path):
    config = _config(tiny_model_dir, toy_data, tmp_path, epochs=2, eval_every=2, max_dev_examples=16)
    trainer, dev_scores = _fit(config)
    # The validation rows are training-file rows the model never trained on.
    for task in ("sst", "para", "sts"):
        file_ids = {e.id for e in load_task_file(task, toy_data / DEFAULT_FILES[(task, "train")]).examples}
        val_ids = {e.id for e in trainer.val_sets[task].examples}
        train_ids = {e.id for e in trainer.train_sets[task].examples}
        assert val_ids <= file_ids and not val_ids & train_ids and len(val_ids) == round(0.1 * len(file_ids))
    records = _records(tmp_path)
    steps_per_epoch = len(trainer.plans[0])
    val = [r for r in records if r["kind"] == "val"]
    expected_steps = sorted({*range(2, 2 * steps_per_epoch, 2), steps_per_epoch, 2 * steps_per_epoch})
    assert [r["step"] for r in val] == expected_steps
    assert [r for r in records if r["kind"] == "dev"] == []  # dev never guides the run
    best = load_checkpoint(tmp_path / "best.pt")
    chosen = max(val, key=lambda r: (evaluation.selection_score({k: r[k] for k in ("sst_acc", "para_acc",
                                                                                   "sts_pearson", "overall")}),
                                     -r["step"]))
    assert (best["selected_on"], best["step"], best["scores"]["overall"]) == ("val", chosen["step"], chosen["overall"])
    # The final record is best.pt's model scored on dev, here rescored by the predictor.
    final = [r for r in records if r["kind"] == "final"]
    assert len(final) == 1 and final[0]["best_step"] == chosen["step"]
    predictor = Predictor.load(tmp_path / "best.pt")
    rescored, _ = predictor.score(trainer.dev_sets)
    assert rescored == pytest.approx(dev_scores) and final[0]["overall"] == dev_scores["overall"]
    split, curves, marked = selection_curves(records)
    assert split == "val" and marked["step"] == chosen["step"]
    assert [step for step, _ in curves["overall"]] == expected_steps


def test_select_on_dev_trains_on_every_row_like_before(tiny_model_dir, toy_data, tmp_path):
    trainer, _ = _fit(_config(tiny_model_dir, toy_data, tmp_path, epochs=2, select_on="dev"))
    assert trainer.val_sets == {} and all(len(t) == 96 for t in trainer.train_sets.values())
    records = _records(tmp_path)
    assert [r["epoch"] for r in records if r["kind"] == "dev"] == [1, 2]
    assert not any(r["kind"] == "val" for r in records)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["selected_on"] == "dev" and selection_curves(records)[2]["step"] == best["step"]


def test_a_checkpoint_from_before_the_validation_split_resumes_as_it_started():
    stored = {k: v for k, v in TrainConfig(out="runs/x").to_dict().items()
              if k not in ("val_fraction", "select_on", "eval_every")}
    config = config_for_resume(stored, {}, "last.pt")
    assert (config.select_on, config.val_fraction) == ("dev", 0.0)


def test_plot_spans_the_run_for_a_single_evaluation():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtbert.multitask.plot import _plot_selection

    records = [{"kind": "train", "step": s, "epoch": 0, "loss": {"sst": 1.0}} for s in (25, 50)]
    records.append({"kind": "val", "step": 50, "epoch": 1, "sst_acc": 0.5, "para_acc": 0.8, "sts_pearson": 0.7,
                    "sts_spearman": 0.7, "overall": 0.72})
    figure, axes = plt.subplots()
    _plot_selection(axes, records, last_step=50)
    left, right = axes.get_xlim()
    assert left == 0 and right > 50  # the whole run, not a unit interval around the lone point
    assert {text.get_text() for text in axes.texts} == {"0.500", "0.800", "0.700", "0.720"}
    stars = [line for line in axes.lines if line.get_marker() == "*"]
    assert len(stars) == 4 and all(list(line.get_xdata()) == [50] for line in stars)
    plt.close(figure)


class _Killed(Exception):
    pass


def test_resume_after_a_mid_epoch_selection_equals_the_uninterrupted_run(tiny_model_dir, toy_data, tmp_path):
    options = dict(epochs=2, eval_every=2, save_every=3, max_dev_examples=12, grad_method="pcgrad")
    _fit(_config(tiny_model_dir, toy_data, tmp_path / "reference", **options))

    def kill_at_step_5(trainer):  # after the evaluation of step 4, whose best.pt may be newer than last.pt
        if trainer.global_step == 5:
            raise _Killed

    killed = tmp_path / "killed"
    with pytest.raises(_Killed):
        Trainer(_config(tiny_model_dir, toy_data, killed, **options), on_step=kill_at_step_5).fit()
    resumed = Trainer(_config(tiny_model_dir, toy_data, killed, **options))
    resumed.load_state_dict(load_checkpoint(killed / "last.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.fit()

    def selection(out):
        return [{k: v for k, v in r.items() if k != "train_minutes"} for r in _records(out)
                if r["kind"] in ("val", "final")]

    assert selection(killed) == selection(tmp_path / "reference")
    best, reference = load_checkpoint(killed / "best.pt"), load_checkpoint(tmp_path / "reference" / "best.pt")
    assert (best["step"], best["scores"]) == (reference["step"], reference["scores"])


def test_runs_with_other_seeds_hold_out_the_same_validation_rows(tiny_model_dir, toy_data, tmp_path):
    ids = []
    for seed in (1, 2):
        trainer = Trainer(_config(tiny_model_dir, toy_data, tmp_path / str(seed), seed=seed))
        ids.append({task: [e.id for e in val.examples] for task, val in trainer.val_sets.items()})
        train_order = {task: [e.id for e in t.examples] for task, t in trainer.train_sets.items()}
    assert ids[0] == ids[1]
    other = Trainer(_config(tiny_model_dir, toy_data, tmp_path / "other", seed=2, val_seed=5))
    assert {task: [e.id for e in val.examples] for task, val in other.val_sets.items()} != ids[1]
    assert {task: [e.id for e in t.examples] for task, t in other.train_sets.items()} != train_order
