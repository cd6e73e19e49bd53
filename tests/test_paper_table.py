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
    assert "| 9 | 0.400 | 0.700 | 0.800 | 0.650 | 1.5 min |" in table[0]
    assert any(line.startswith("| paper") for line in lines)


def test_render_escapes_pipes_in_descriptions():
    scores = {"sst_acc": 0.4, "para_acc": 0.7, "sts_pearson": 0.8, "sts_spearman": 0.79, "overall": 0.65}
    results = {"sbert": {"row": "sbert", "description": "(u, v, |u-v|)", "argv": [], "steps": 1, "wall_s": 1.0,
                         "scores": scores}}
    row = next(line for line in paper_table.render(results, "").splitlines() if line.startswith("| sbert"))
    assert row.replace("\\|", "").count("|") == 10  # the table's own 10 column borders


def test_validation_split_is_carved_from_the_training_files(tmp_path):
    from mtbert.data import write_synthetic_data
    from mtbert.multitask.data import DEFAULT_FILES, TASKS

    data = write_synthetic_data(tmp_path / "data", n_train=40, n_dev=4, n_test=4, seed=1)
    flags = paper_table.carve_validation(data, tmp_path / "split", 7)
    paths = dict(zip(flags[::2], flags[1::2]))
    for task in TASKS:
        header, *records = (data / DEFAULT_FILES[(task, "train")]).read_text(encoding="utf-8").splitlines()
        train = (tmp_path / "split" / f"{task}-train.csv").read_text(encoding="utf-8").splitlines()
        validation = (tmp_path / "split" / f"{task}-validation.csv").read_text(encoding="utf-8").splitlines()
        assert train[0] == validation[0] == header and len(validation) == 8
        assert sorted(train[1:] + validation[1:]) == sorted(records)  # disjoint, nothing lost
        assert paths[f"--{task}_dev"] == str(tmp_path / "split" / f"{task}-validation.csv")
    again = paper_table.carve_validation(data, tmp_path / "again", 7)
    assert (tmp_path / "again" / "sst-validation.csv").read_text() == (tmp_path / "split" / "sst-validation.csv").read_text()
    assert len(again) == 4 * len(TASKS)


def test_render_prints_the_pcgrad_seed_spread():
    def result(row, overall):
        scores = {"sst_acc": 0.4, "para_acc": 0.7, "sts_pearson": 0.8, "sts_spearman": 0.79, "overall": overall}
        return {"row": row, "description": row, "argv": [], "steps": 1, "wall_s": 1.0, "scores": scores,
                "scored_on": "validation (7/task)"}

    results = {r: result(r, o) for r, o in (("pcgrad", 0.60), ("pcgrad@2", 0.64), ("pcgrad@3", 0.62), ("mgda", 0.5))}
    text = paper_table.render(results, "# t")
    assert "3 seeds, validation (7/task)): overall 0.600–0.640, standard deviation 0.020" in text
    assert "| validation (7/task) |" in text
    assert "spread" not in paper_table.render({"pcgrad": result("pcgrad", 0.6)}, "# t")
