"""Summarises one configuration trained with several seeds: mean ± standard deviation of the dev
scores of each run's best.pt (chosen on the validation split, dev scored once), against issue 15's
targets.

Each RUN is an ``mtbert.train --out`` directory; its scores come from the ``final`` record of its
metrics.jsonl and its seed from config.json. Wall time is read from ``RUN.wall_s`` beside the
directory (seconds from the launch of ``mtbert.train`` to its exit, written by whoever timed the
run) and marked "not recorded" when that file is absent.

    python benchmarks/seed_runs.py runs/final/seed-11711 runs/final/seed-1 runs/final/seed-2 \\
        --title "cross heads, STS MSE, proportional sampling, 3 epochs, --bf16" \\
        --output benchmarks/results/seed_runs.md
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from paper_table import final_record, write_atomically

METRICS = (("sst_acc", "SST acc"), ("para_acc", "Quora acc"), ("sts_pearson", "STS Pearson"), ("overall", "overall"))
# Issue 15's goals: dev, mean of 3 seeds, one shared encoder, <= 60 min for everything.
TARGETS = {"sst_acc": 0.52, "para_acc": 0.87, "sts_pearson": 0.885}
WALL_LIMIT_MIN = 60


def load_run(run: Path) -> dict:
    if not (run / "metrics.jsonl").is_file():
        raise SystemExit(f"{run}: no metrics.jsonl (not an mtbert.train --out directory)")
    final = final_record(run)
    if final.get("selected_on") != "val":
        raise SystemExit(f"{run}: best.pt was chosen on {final.get('selected_on')!r}, not on the validation split")
    config = json.loads((run / "config.json").read_text())
    wall_file = run.with_name(run.name + ".wall_s")
    wall_s = float(wall_file.read_text()) if wall_file.is_file() else None
    return {"run": str(run), "seed": config["seed"], "best_step": final["best_step"], "steps": final["step"],
            "dev": {key: final[key] for key, _ in METRICS}, "validation": final["selection_scores"],
            "wall_s": wall_s}


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def render(runs, title, command=None) -> str:
    lines = [f"# {title}", "",
             f"{len(runs)} seeds; each run's best.pt chosen on its validation split (10% of each training file), "
             "dev scored once for it. Wall time: launch to exit of `mtbert.train` (loading, training, validation "
             "evaluations, dev scoring, predictions).", "",
             "| seed | best step / steps | validation overall | " + " | ".join(name for _, name in METRICS)
             + " | wall |",
             "|---|---|---|" + "---:|" * len(METRICS) + "---:|"]
    for r in runs:
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] is not None else "not recorded"
        lines.append(f"| {r['seed']} | {r['best_step']} / {r['steps']} | {r['validation']['overall']:.3f} | "
                     + " | ".join(f"{r['dev'][key]:.3f}" for key, _ in METRICS) + f" | {wall} |")
    summary = {key: mean_std([r["dev"][key] for r in runs]) for key, _ in METRICS}
    walls = [r["wall_s"] / 60 for r in runs if r["wall_s"] is not None]
    longest = f"{max(walls):.1f} min (longest)" if walls else "not recorded"
    lines.append("| **mean ± std** | | | " + " | ".join(f"**{m:.3f} ± {s:.3f}**" for m, s in summary.values())
                 + f" | {longest} |")
    lines += ["", "| target (dev, mean of the seeds) | goal | measured | met? |", "|---|---:|---:|---|"]
    for key, name in METRICS:
        if key in TARGETS:
            mean = summary[key][0]
            lines.append(f"| {name} | ≥ {TARGETS[key]:.3f} | {mean:.3f} | {'yes' if mean >= TARGETS[key] else 'no'} |")
    if walls:
        lines.append(f"| wall time per model | ≤ {WALL_LIMIT_MIN} min | {max(walls):.1f} min | "
                     f"{'yes' if max(walls) <= WALL_LIMIT_MIN else 'no'} |")
    if command:
        lines += ["", "Command (SEED = each row's seed):", "", f"    {command}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="mtbert.train --out directories, one per seed")
    parser.add_argument("--title", required=True, help="the configuration, as the table's heading")
    parser.add_argument("--command", help="the training command, printed under the table")
    parser.add_argument("--output", type=Path, help="also write the markdown here (and the numbers as .json)")
    args = parser.parse_args(argv)
    runs = [load_run(run) for run in args.runs]
    text = render(runs, args.title, args.command)
    if args.output:
        write_atomically(args.output, text)
        write_atomically(args.output.with_suffix(".json"), json.dumps(runs, indent=1) + "\n")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
