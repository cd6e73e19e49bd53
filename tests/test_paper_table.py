"""benchmarks/paper_table.py: every row's argument list is a valid `mtbert.train` command (the
train CLI's own parser and TrainConfig validation), with the configuration the row names, and
the table renders every finished row."""
import pytest
from benchmark_scripts import load_benchmark_script

from mtbert.train import build_parser, config_for_new_run, settings_from_args

paper_table = load_benchmark_script("paper_table")


@pytest.mark.parametrize("name", paper_table.ROW_NAMES)
def test_row_parses_into_train_config(name, tmp_path):
    _, _, flags = next(row for row in paper_table.ROWS if row[0] == name)
    argv = paper_table.train_argv(flags, tmp_path / "data", tmp_path / "out", steps=7, batch_size=3, seed=5,
                                  max_dev_examples=11)
    config = config_for_new_run(settings_from_args(build_parser().parse_args(argv)))
    assert config.max_train_examples == 21 and config.batch_size == 3 and config.seed == 5
    assert config.max_dev_examples == 11 and config.epochs == 1 and config.out == str(tmp_path / "out")
    options = dict(zip(flags[::2], flags[1::2]))  # every row flag takes one value
    assert config.option == options["--option"] and config.lr == float(options["--lr"])
    assert (config.para_head, config.sts_head, config.sts_loss, config.grad_method) == (
        options["--para-head"], options["--sts-head"], options["--sts-loss"], options["--grad-method"])
    assert config.layer_lr_decay == float(options.get("--layer-lr-decay", 1.0))
    assert config.head_lr == (float(options["--head-lr"]) if "--head-lr" in options else None)
    assert config.rdrop == float(options.get("--rdrop", 0.0))
    assert config.eval_every == int(options.get("--eval-every", 0))
    assert config.task_patience == int(options.get("--task-patience", 0))
    assert config.task_sampling == options.get("--task-sampling", "round-robin")
    assert (config.select_on, config.val_fraction) == ("val", 0.1)  # rows are compared on the validation split


def test_rows_cover_the_papers_ablations():
    configs = {name: dict(zip(flags[::2], flags[1::2])) for name, _, flags in paper_table.ROWS}
    assert configs["pretrain"]["--option"] == "pretrain"
    assert {c["--grad-method"] for c in configs.values()} == {"sum", "main-aux", "pcgrad", *paper_table.METHOD_ROWS}
    assert {c["--sts-head"] for c in configs.values()} >= {"concat", "cosine", "sbert", "cross"}
    assert {c["--sts-loss"] for c in configs.values()} >= {"mse", "ce", "cosent"}


def test_render_lists_rows_in_table_order_with_wall_time():
    scores = {"sst_acc": 0.4, "para_acc": 0.7, "sts_pearson": 0.8, "sts_spearman": 0.79, "overall": 0.65}
    results = {name: {"row": name, "description": name, "argv": ["--x"], "steps": 9, "wall_s": 90.0, "scores": scores}
               for name in ("pcgrad", "pretrain")}
    lines = paper_table.render(results, "# t").splitlines()
    table = [line for line in lines if line.startswith("| pretrain") or line.startswith("| pcgrad")]
    assert table[0].startswith("| pretrain") and table[1].startswith("| pcgrad")
    assert "| 9 | – | 0.400 | 0.700 | 0.800 | 0.650 | 1.5 min |" in table[0]  # chosen on dev: no validation score
    results["pcgrad"]["validation"] = {**scores, "overall": 0.61}
    pcgrad = next(line for line in paper_table.render(results, "").splitlines() if line.startswith("| pcgrad"))
    assert "| 9 | 0.610 | 0.400 |" in pcgrad
    assert any(line.startswith("| paper") for line in lines)


def test_render_escapes_pipes_in_descriptions():
    scores = {"sst_acc": 0.4, "para_acc": 0.7, "sts_pearson": 0.8, "sts_spearman": 0.79, "overall": 0.65}
    results = {"sbert": {"row": "sbert", "description": "(u, v, |u-v|)", "argv": [], "steps": 1, "wall_s": 1.0,
                         "scores": scores}}
    row = next(line for line in paper_table.render(results, "").splitlines() if line.startswith("| sbert"))
    assert row.replace("\\|", "").count("|") == 10  # the table's own 10 column borders


def test_render_prints_the_pcgrad_seed_spread_of_the_validation_score():
    def result(row, validation):
        scores = {"sst_acc": 0.4, "para_acc": 0.7, "sts_pearson": 0.8, "sts_spearman": 0.79, "overall": 0.9}
        return {"row": row, "description": row, "argv": [], "steps": 1, "wall_s": 1.0, "scores": scores,
                "validation": {"overall": validation}}

    results = {r: result(r, v) for r, v in (("pcgrad", 0.60), ("pcgrad@2", 0.64), ("pcgrad@3", 0.62), ("mgda", 0.5))}
    text = paper_table.render(results, "# t")
    # statistics.stdev of 0.60, 0.64, 0.62 (sample standard deviation) is 0.020
    assert "(3 seeds, validation overall): 0.600–0.640, standard deviation 0.020" in text
    assert "spread" not in paper_table.render({"pcgrad": result("pcgrad", 0.6)}, "# t")
    assert "spread" not in paper_table.render({"pcgrad": result("pcgrad", 0.6), "pcgrad@2": {**result("pcgrad@2", 0),
                                                                                        "validation": None}}, "# t")
