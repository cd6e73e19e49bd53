"""benchmarks/seed_runs.py: the 3-seed summary of issue 15 (mean ± sample standard deviation of
each run's dev scores, targets met or not) from mtbert.train output directories."""
import json
import sys

import numpy as np
import pytest
from benchmark_scripts import load_benchmark_script


@pytest.fixture(scope="module")
def seed_runs():
    sys.modules.setdefault("paper_table", load_benchmark_script("paper_table"))  # seed_runs imports it by name
    return load_benchmark_script("seed_runs")


def fake_run(root, seed, dev, selected_on="val", wall_s=None):
    run = root / f"seed-{seed}"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"seed": seed}))
    validation = {key: value - 0.01 for key, value in dev.items()}
    records = [{"kind": "val", "step": 10, **validation},
               {"kind": "final", "step": 20, "best_step": 10, "selected_on": selected_on,
                "selection_scores": validation, **dev}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if wall_s is not None:
        run.with_name(run.name + ".wall_s").write_text(f"{wall_s}\n")
    return run


def test_mean_and_sample_std_per_metric_and_targets(seed_runs, tmp_path):
    rng = np.random.default_rng()
    devs = [dict(zip(("sst_acc", "para_acc", "sts_pearson", "overall"), rng.uniform(0.4, 0.9, 4))) for _ in range(3)]
    runs = [fake_run(tmp_path, seed, dev, wall_s=600 + 100 * seed) for seed, dev in zip((11711, 1, 2), devs)]
    output = tmp_path / "summary.md"
    seed_runs.main([*map(str, runs), "--title", "t", "--output", str(output)])
    text = output.read_text()
    mean_row = next(line for line in text.splitlines() if line.startswith("| **mean ± std**"))
    for key in ("sst_acc", "para_acc", "sts_pearson", "overall"):
        values = np.array([dev[key] for dev in devs])
        assert f"**{values.mean():.3f} ± {values.std(ddof=1):.3f}**" in mean_row
    assert f"{(600 + 100 * 11711) / 60:.1f} min (longest)" in mean_row
    sst_target = next(line for line in text.splitlines() if line.startswith("| SST acc | ≥ 0.520"))
    assert sst_target.endswith("| yes |" if np.mean([d["sst_acc"] for d in devs]) >= 0.52 else "| no |")
    stored = json.loads(output.with_suffix(".json").read_text())
    assert [r["seed"] for r in stored] == [11711, 1, 2] and stored[0]["wall_s"] == 600 + 100 * 11711


def test_refuses_a_run_chosen_on_dev(seed_runs, tmp_path):
    run = fake_run(tmp_path, 3, {"sst_acc": 0.5, "para_acc": 0.8, "sts_pearson": 0.8, "overall": 0.7},
                   selected_on="dev")
    with pytest.raises(SystemExit, match="chosen on 'dev'"):
        seed_runs.main([str(run), "--title", "t"])


def test_missing_wall_time_is_marked(seed_runs, tmp_path):
    run = fake_run(tmp_path, 4, {"sst_acc": 0.5, "para_acc": 0.8, "sts_pearson": 0.8, "overall": 0.7})
    assert "not recorded" in seed_runs.render([seed_runs.load_run(run)], "t")
