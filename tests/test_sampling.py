"""Adaptive task sampling: per-task early stopping (--task-patience) on a scripted sequence of
validation scores, validation-driven probabilities (--task-sampling validation) against their
formula and the draws against the probabilities, and exact resume of both."""
import json

import pytest
import torch

from mtbert.multitask import checkpoint as checkpoints
from mtbert.multitask.sampling import AdaptiveSampling, validation_probabilities
from mtbert.multitask.trainer import Trainer, TrainConfig

TASKS = ("sst", "para", "sts")


def _scores(sst, para, sts):
    return {"sst_acc": sst, "para_acc": para, "sts_pearson": sts, "sts_spearman": sts, "overall": 0.0}


# Validation scores after each step (evaluated every step): para peaks at step 1, sst at step 2,
# sts at step 3; with patience 2, para stops after step 3, sst after step 4, sts after step 5.
SCRIPT = {1: _scores(0.30, 0.70, 0.50), 2: _scores(0.40, 0.60, 0.55), 3: _scores(0.35, 0.65, 0.60),
          4: _scores(0.39, 0.69, 0.58), 5: _scores(0.40, 0.50, 0.60)}


def test_patience_stops_each_task_after_its_last_improvement():
    sampling = AdaptiveSampling(TASKS, "round-robin", patience=2)
    stopped = [sampling.observe(SCRIPT[step]) for step in sorted(SCRIPT)]
    assert stopped == [[], [], ["para"], ["sst"], ["sts"]]  # a tie (sst 0.40 at step 5) is no improvement
    assert sampling.exhausted
    partial = AdaptiveSampling(TASKS, "round-robin", patience=2)
    for step in (1, 2, 3):
        partial.observe(SCRIPT[step])
    assert partial.step_tasks(list(TASKS), step=4) == ["sst", "sts"]  # round-robin: the active tasks' slots
    proportional = AdaptiveSampling(TASKS, "proportional", patience=2)
    assert proportional.step_tasks(["sst", "sst", "para"], step=0) == ["sst", "sst", "para"]  # the plan, untouched
    proportional.load_state_dict(partial.state_dict())
    drawn = proportional.step_tasks(["para", "para", "para"], step=4, probabilities={"sst": 0.5, "para": 0.3,
                                                                                    "sts": 0.2})
    assert len(drawn) == 3 and "para" not in drawn


def test_validation_probabilities_follow_the_formula():
    floor = 0.2
    probabilities = validation_probabilities(TASKS, _scores(0.46, 0.80, 0.84), floor)
    gaps = {"sst": 0.54, "para": 0.20, "sts": 0.16}
    for task, gap in gaps.items():
        assert probabilities[task] == pytest.approx(floor / 3 + (1 - floor) * gap / 0.90)
    assert sum(probabilities.values()) == pytest.approx(1.0)
    clamped = validation_probabilities(TASKS, _scores(1.0, 0.5, -0.2), 0.1)  # gaps 0, 0.5, 1 (Pearson < 0)
    assert clamped == pytest.approx({"sst": 0.1 / 3, "para": 0.1 / 3 + 0.9 / 3, "sts": 0.1 / 3 + 0.9 * 2 / 3})
    assert validation_probabilities(TASKS, _scores(1.0, 1.0, 1.0), 0.2) == pytest.approx(dict.fromkeys(TASKS, 1 / 3))


def test_validation_draws_follow_the_probabilities():
    sampling = AdaptiveSampling(TASKS, "validation", floor=0.2, seed=3)
    steps = 4000
    before = [t for step in range(steps) for t in sampling.step_tasks(list(TASKS), step)]  # uniform at first
    sampling.observe(_scores(0.46, 0.80, 0.84))
    after = [t for step in range(steps) for t in sampling.step_tasks(list(TASKS), step)]
    n = 3 * steps
    for draws, expected in ((before, dict.fromkeys(TASKS, 1 / 3)), (after, sampling.probabilities)):
        for task, p in expected.items():
            sigma = (n * p * (1 - p)) ** 0.5
            assert abs(draws.count(task) - n * p) < 4 * sigma, (task, draws.count(task), n * p)
    assert sampling.step_tasks(list(TASKS), 17) == sampling.step_tasks(list(TASKS), 17)  # seeded by the step
    assert AdaptiveSampling(TASKS, "validation", seed=4).step_tasks(list(TASKS), 1) is not None


@pytest.fixture(autouse=True)
def _no_plot(monkeypatch):
    """metrics.png is not under test here (and drawing it is most of a tiny run's time)."""
    monkeypatch.setattr("mtbert.multitask.plot.plot_metrics", lambda out: out / "metrics.png")


def _config(tiny_model_dir, toy_data, out, **overrides):
    settings = dict(data=str(toy_data), out=str(out), model=str(tiny_model_dir), epochs=1, batch_size=16, lr=1e-3,
                    hidden_dropout_prob=0.1, max_length=32, progress=False, log_every=1, eval_every=1,
                    max_dev_examples=12)
    return TrainConfig(**{**settings, **overrides})


def _scripted_trainer(config, **options):
    """A trainer whose validation evaluations return SCRIPT[step] (dev is really evaluated), and
    which records every step's task slots."""
    trainer = Trainer(config, **options)
    real_evaluate, steps = trainer.evaluate, []

    def evaluate(sets=None, sharded=True):
        if sets is trainer.val_sets:
            return SCRIPT.get(trainer.global_step, SCRIPT[5]), {}
        return real_evaluate(sets, sharded)

    def run_step(tasks, *micro_batches):
        steps.append(list(tasks))
        return Trainer.run_step(trainer, tasks, *micro_batches)

    trainer.evaluate, trainer.run_step, trainer.step_slots = evaluate, run_step, steps
    return trainer


def _records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_patience_stops_tasks_and_ends_training_early(tiny_model_dir, toy_data, tmp_path):
    trainer = _scripted_trainer(_config(tiny_model_dir, toy_data, tmp_path, task_patience=2))
    assert trainer.total_steps == 6  # round-robin steps of 16 of the 86 training rows of each task
    trainer.fit()
    assert trainer.step_slots == [list(TASKS)] * 3 + [["sst", "sts"], ["sts"]]
    records = _records(tmp_path, "sampling")
    assert [r["stopped_tasks"] for r in records] == [[], [], ["para"], ["para", "sst"], ["para", "sst", "sts"]]
    assert records[1]["evaluations_without_improvement"] == {"sst": 0, "para": 1, "sts": 0}
    assert _records(tmp_path, "final")[0]["step"] == 5  # ended at the evaluation that stopped the last task
    assert checkpoints.load_checkpoint(tmp_path / "last.pt")["task_sampling"]["stopped"] == ["para", "sst", "sts"]


@pytest.mark.parametrize("options", [dict(task_patience=2), dict(task_sampling="validation", save_every=3)])
def test_resume_after_kill_equals_uninterrupted_run(tiny_model_dir, toy_data, tmp_path, options):
    options = {"save_every": 2, **options}
    reference = _scripted_trainer(_config(tiny_model_dir, toy_data, tmp_path / "reference", **options))
    reference.fit()

    class Killed(Exception):
        pass

    def kill(trainer):  # the checkpoint of step save_every survives, the step after it is lost
        if trainer.global_step == options["save_every"] + 1:
            raise Killed

    killed_out = tmp_path / "killed"
    with pytest.raises(Killed):
        _scripted_trainer(_config(tiny_model_dir, toy_data, killed_out, **options), on_step=kill).fit()
    state = checkpoints.load_checkpoint(killed_out / "last.pt")
    assert state["global_step"] == options["save_every"]
    resumed = _scripted_trainer(_config(tiny_model_dir, toy_data, killed_out, **options))
    resumed.load_state_dict(state)
    resumed.fit()

    assert reference.step_slots[options["save_every"]:] == resumed.step_slots
    if "task_sampling" in options:  # the draws changed after the first evaluation
        assert len({tuple(slots) for slots in reference.step_slots}) > 1
    final_reference = checkpoints.load_checkpoint(tmp_path / "reference" / "last.pt")["model"]
    final_resumed = checkpoints.load_checkpoint(killed_out / "last.pt")["model"]
    for name, value in final_reference.items():
        assert torch.equal(value, final_resumed[name]), name
    assert _records(killed_out, "sampling") == _records(tmp_path / "reference", "sampling")


@pytest.mark.parametrize("settings, message", [(dict(task_patience=-1), "task_patience must be >= 0"),
                                               (dict(sampling_floor=1.5), r"sampling_floor must be in \[0, 1\]")])
def test_bad_values_are_errors(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(data=str(tmp_path), out=str(tmp_path), **settings)
