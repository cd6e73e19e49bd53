"""``mtbert-plot OUT``: training loss per task and dev metrics per epoch from ``OUT/metrics.jsonl``;
when the run logged them, the gradient method's per-task weights and the pairwise cosines of the
task gradients (how conflicts and weights evolve)."""
import argparse
import json
import sys
from pathlib import Path

DEV_METRICS = (("sst_acc", "SST acc"), ("para_acc", "Quora acc"), ("sts_pearson", "STS Pearson"),
               ("overall", "overall"))


def read_metrics(path) -> list:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is it a training output directory?)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(run_dir, output=None) -> Path:
    """Draws ``run_dir/metrics.jsonl`` into a PNG (default ``run_dir/metrics.png``); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = read_metrics(run_dir)
    output = Path(output) if output else Path(run_dir) / "metrics.png"
    train = [r for r in records if r["kind"] == "train"]
    dev = [r for r in records if r["kind"] == "dev"]
    gradients = [r for r in train if "grad_weights" in r]
    rows = 2 if gradients else 1
    figure, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    (loss_axes, dev_axes) = axes[0]
    for task in sorted({t for r in train for t in r["loss"]}):
        points = [(r["step"], r["loss"][task]) for r in train if task in r["loss"]]
        loss_axes.plot(*zip(*points), label=task)
    loss_axes.set(xlabel="step", ylabel="training loss (mean since last point)", title="training loss per task")
    if train:
        loss_axes.legend()
    for key, name in DEV_METRICS:
        points = [(r["epoch"], r[key]) for r in dev if key in r]
        if points:
            dev_axes.plot(*zip(*points), marker="o", label=name)
    dev_axes.set(xlabel="epoch", ylabel="dev score", title="dev metrics per epoch")
    dev_axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if dev:
        dev_axes.legend()
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
