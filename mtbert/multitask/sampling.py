"""Task sampling that follows the validation evaluations of a run (issue 15):

- per-task early stopping (``--task-patience N``): after each evaluation, a task whose validation
  score has not improved for N evaluations in a row is no longer drawn; the others go on; when
  every task has stopped, training ends;
- validation-driven probabilities (``--task-sampling validation``): after each evaluation a step's
  task slots are drawn with p_k = ε/K + (1 − ε)·g_k / Σ_j g_j, where g_k = 1 − clamp(score_k, 0, 1)
  is what task k still lacks to a perfect score (accuracy, or STS Pearson) and ε the floor
  (``--sampling-floor``) that keeps every task drawn; uniform before the first evaluation.

Its state is a few numbers saved in the training checkpoint, and each step's draw is seeded by the
run's seed and the step, so a resumed run draws exactly what the uninterrupted run drew."""
import math
import random

# The validation score of each task that its patience and its sampling probability follow.
TASK_SCORES = {"sst": "sst_acc", "para": "para_acc", "sts": "sts_pearson"}


def validation_probabilities(tasks, scores, floor):
    """{task: p} of ``--task-sampling validation`` for the validation ``scores`` (evaluation
    metrics, :data:`TASK_SCORES`): p_k = floor/K + (1 − floor)·g_k/Σ g, g_k = 1 − clamp(score_k, 0, 1);
    uniform when every gap is 0."""
    gaps = {task: 1.0 - min(max(scores[TASK_SCORES[task]], 0.0), 1.0) for task in tasks}
    total = sum(gaps.values())
    if total == 0:
        return {task: 1.0 / len(tasks) for task in tasks}
    return {task: floor / len(tasks) + (1.0 - floor) * gap / total for task, gap in gaps.items()}


class AdaptiveSampling:
    """The task slots of each step under ``--task-patience`` and ``--task-sampling validation``.

    ``observe(scores)`` after every evaluation; ``step_tasks(planned, step, probabilities)`` before
    every step. With neither lever (patience 0, another sampling) every step is the epoch plan's."""

    def __init__(self, tasks, sampling, patience=0, floor=0.2, seed=0):
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        self.tasks, self.sampling, self.patience, self.floor, self.seed = tuple(tasks), sampling, patience, floor, seed
        self.best = {}  # task → best validation score so far
        self.stale = {task: 0 for task in self.tasks}  # evaluations since the task's best
        self.stopped = []  # tasks no longer drawn, in the order they stopped
        self.probabilities = None  # --task-sampling validation: {task: p} of the last evaluation

    @property
    def active(self):
        return [task for task in self.tasks if task not in self.stopped]

    @property
    def exhausted(self) -> bool:
        """Whether every task has stopped: training ends."""
        return not self.active

    def observe(self, scores) -> list:
        """Takes one evaluation's metrics; returns the tasks it stops (patience exhausted)."""
        if self.sampling == "validation":
            self.probabilities = validation_probabilities(self.tasks, scores, self.floor)
        if not self.patience:
            return []
        newly_stopped = []
        for task in self.active:
            score = scores[TASK_SCORES[task]]
            if score > self.best.get(task, -math.inf):
                self.best[task], self.stale[task] = score, 0
            else:
                self.stale[task] += 1
                if self.stale[task] >= self.patience:
                    newly_stopped.append(task)
        self.stopped += newly_stopped
        return newly_stopped

    def step_tasks(self, planned, step, probabilities=None):
        """The task slots of optimizer step ``step`` (counted over the run): ``planned``, the epoch
        plan's slots, while no lever changes them; else as many slots drawn among the active tasks
        (validation: by :attr:`probabilities`, uniform before the first evaluation; proportional /
        annealed: by the plan's ``probabilities`` ({task: p}) restricted to them); round-robin:
        the planned slots of the active tasks."""
        if self.sampling != "validation" and not self.stopped:
            return planned
        active = self.active
        if self.sampling == "round-robin":
            return [task for task in planned if task in active]
        if self.sampling == "validation":
            probabilities = self.probabilities or {task: 1.0 for task in self.tasks}
        weights = [probabilities[task] for task in active]
        rng = random.Random(f"{self.seed}-draw-{step}")
        return sorted(rng.choices(active, weights, k=len(planned)), key=self.tasks.index)

    def record(self) -> dict:
        """What metrics.jsonl keeps of the sampling after an evaluation."""
        record = {"stopped_tasks": list(self.stopped)}
        if self.patience:
            record["evaluations_without_improvement"] = {task: self.stale[task] for task in self.active}
        if self.probabilities is not None:
            record["task_probabilities"] = self.probabilities
        return record

    def state_dict(self):
        return {"best": dict(self.best), "stale": dict(self.stale), "stopped": list(self.stopped),
                "probabilities": self.probabilities}

    def load_state_dict(self, state):
        self.best, self.stale = dict(state["best"]), dict(state["stale"])
        self.stopped, self.probabilities = list(state["stopped"]), state["probabilities"]
