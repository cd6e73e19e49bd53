"""``mtbert-plot OUT``: training loss per task and the selection split's metrics (validation, or
dev with --select-on dev) against steps from ``OUT/metrics.jsonl``, the chosen checkpoint marked;
when the run logged them, the gradient method's per-task weights and the pairwise cosines of the
task gradients (how conflicts and weights evolve)."""
import argparse
import json
import sys
from pathlib import Path

from .evaluate import selection_score

DEV_METRICS = (("sst_acc", "SST acc"), ("para_acc", "Quora acc"), ("sts_pearson", "STS Pearson"),
               ("overall", "overall"))
SCORE_KEYS = ("sst_acc", "para_acc", "sts_pearson", "sts_spearman", "overall")
SPLIT_NAMES = {"val": "validation", "dev": "dev"}


def read_metrics(path) -> list:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is it a training output directory?)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def selection_curves(records) -> tuple:
    """The evaluations that chose the checkpoint: ``(split, {metric: [(step, value)]}, best)``,
    ``split`` being ``'val'`` or ``'dev'`` (runs that select on dev, and runs written before the
    validation split), ``best`` the record with the highest selection score (the first on a tie, as
    the trainer keeps it), None when there is no evaluation."""
    split = "val" if any(r["kind"] == "val" for r in records) else "dev"
    evaluations = [r for r in records if r["kind"] == split]
    curves = {key: [(r["step"], r[key]) for r in evaluations if key in r] for key, _ in DEV_METRICS}
    best = None
    for record in evaluations:
        if best is None or selection_score(_scores(record)) > selection_score(_scores(best)):
            best = record
    return split, {key: points for key, points in curves.items() if points}, best


def _scores(record):
    """The metrics of an evaluation record, without its step, epoch and timing."""
    return {k: v for k, v in record.items() if k in SCORE_KEYS}


def _plot_selection(axes, records, last_step):
    """The selection split's metrics against steps on ``axes``, the chosen checkpoint marked. The
    x axis spans the whole run, so one evaluation (a one-epoch run without --eval-every) shows as
    a labelled point at the run's end, not as a dot alone on its own scale."""
    split, curves, best = selection_curves(records)
    name = SPLIT_NAMES[split]
    for key, label in DEV_METRICS:
        if key not in curves:
            continue
        steps, values = zip(*curves[key])
        (line,) = axes.plot(steps, values, marker="o", markersize=3, label=label)
        if len(values) == 1:
            axes.annotate(f"{values[0]:.3f}", (steps[0], values[0]), textcoords="offset points", xytext=(-8, 4),
                          ha="right", color=line.get_color())
        if best is not None and key in best:
            axes.plot([best["step"]], [best[key]], marker="*", markersize=12, color=line.get_color())
    if best is not None:
        axes.axvline(best["step"], color="grey", linestyle=":", label=f"chosen (step {best['step']})")
        axes.legend(fontsize="small")
    axes.set_xlim(0, max(last_step, best["step"] if best else 0) * 1.02 + 1)
    axes.set(xlabel="step", ylabel=f"{name} score", title=f"{name} metrics (best.pt marked)")


def plot_metrics(run_dir, output=None) -> Path:
    """Draws ``run_dir/metrics.jsonl`` into a PNG (default ``run_dir/metrics.png``); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    output = Path(output) if output else Path(run_dir) / "metrics.png"
    train = [r for r in records if r["kind"] == "train"]
    gradients = [r for r in train if "grad_weights" in r]
    rows = 2 if gradients else 1
    # One step axis for every panel: losses, evaluations and weights line up, and the run's full length shows.
    figure, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False, sharex=True)
    (loss_axes, dev_axes) = axes[0]
    for task in sorted({t for r in train for t in r["loss"]}):
        points = [(r["step"], r["loss"][task]) for r in train if task in r["loss"]]
        loss_axes.plot(*zip(*points), marker="o", markersize=2, label=task)  # a one-record run shows its point
    loss_axes.set(xlabel="step", ylabel="training loss (mean since last point)", title="training loss per task")
    if train:
        loss_axes.legend()
    _plot_selection(dev_axes, records, max((r["step"] for r in records), default=0))
    if gradients:
        _plot_series(axes[1][0], gradients, "grad_weights", "weight of the task's gradient",
                     "gradient-method weights (shared parameters)")
        _plot_series(axes[1][1], gradients, "grad_cosines", "cosine", "pairwise cosines of the task gradients")
        axes[1][1].axhline(0.0, color="grey", linewidth=0.8)  # below: the tasks conflict
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def _plot_series(axes, records, key, ylabel, title):
    for name in sorted({n for r in records for n in r[key]}):
        points = [(r["step"], r[key][name]) for r in records if name in r[key]]
        axes.plot(*zip(*points), label=name)
    axes.set(xlabel="step", ylabel=ylabel, title=title)
    axes.legend()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mtbert-plot", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a training output directory (holding metrics.jsonl)")
    parser.add_argument("--output", type=Path, help="PNG to write (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    print(plot_metrics(args.run_dir, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
