"""Package-level promises: every documented command parses, the training CLI is generated from
TrainConfig (one declaration per setting), ``import mtbert.optim`` stays light, and a missing
huggingface_hub gives the usual "model not found" error."""
import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mtbert.data import build_parser as data_parser
from mtbert.errors import MissingFileError
from mtbert.multitask.trainer import TrainConfig
from mtbert.pretrained import resolve_model_dir
from mtbert.train import build_parser, config_for_new_run, settings_from_args

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "benchmarks/results/best_config.md", "benchmarks/results/paper_table.md",
             "benchmarks/results/levers.md"]


def _documented_commands():
    """(where, module, arguments) of every `python -m mtbert.train|data` command in the docs (code
    blocks with their continuation lines, inline code, the paper table's argument lists) and the
    Makefile's demo recipe with its variables substituted."""
    commands = []
    for name in DOCUMENTS:
        text = (REPO / name).read_text(encoding="utf-8").replace("\\\n", " ")
        for match in re.finditer(r"python -m mtbert\.(train|data) (?!\.\.\.)([^`\n]*)", text):  # not "train ..."
            commands.append((name, match.group(1), match.group(2)))
        for match in re.finditer(r"^- [\w@-]+: `(--data [^`]*)`", text, re.MULTILINE):
            commands.append((name, "train", match.group(1)))
    makefile = (REPO / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+) \?= (.*)$", makefile, re.MULTILINE))
    recipe = re.search(r"-m mtbert\.train (.*)$", makefile, re.MULTILINE).group(1)
    recipe = re.sub(r"\$\((\w+)\)", lambda m: "data" if m.group(1) == "DEMO_DATA" else variables[m.group(1)], recipe)
    commands.append(("Makefile", "train", recipe))
    return commands


COMMANDS = _documented_commands()


def test_the_documents_hold_the_commands_this_test_expects():
    where = [(name, module) for name, module, _ in COMMANDS]
    assert where.count(("README.md", "train")) == 2 and where.count(("README.md", "data")) == 3
    for table in ("paper_table", "levers"):  # one command per stored row
        rows = json.loads((REPO / f"benchmarks/results/{table}.json").read_text())
        assert where.count((f"benchmarks/results/{table}.md", "train")) == len(rows)
    assert ("benchmarks/results/best_config.md", "train") in where and ("Makefile", "train") in where


@pytest.mark.parametrize("where, module, arguments", COMMANDS, ids=[f"{c[0]}:{i}" for i, c in enumerate(COMMANDS)])
def test_documented_command_parses(where, module, arguments, monkeypatch):
    argv = shlex.split(arguments)
    if module == "data":
        data_parser().parse_args(argv)
        return
    monkeypatch.delenv("MTBERT_DATA", raising=False)
    settings = settings_from_args(build_parser().parse_args(argv))
    config = config_for_new_run(settings)  # TrainConfig's own validation too
    assert config.data == settings["data"] and config.out == settings["out"]


def test_every_setting_has_one_flag_and_the_dataclass_defaults(monkeypatch):
    monkeypatch.delenv("MTBERT_DATA", raising=False)
    assert config_for_new_run(settings_from_args(build_parser().parse_args([]))) == TrainConfig()
    parser = build_parser()
    destinations = {action.dest for action in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        keys = field.metadata["cli"].get("per_key")
        assert ({f"{field.name}.{key}" for key in keys} if keys else {field.name}) <= destinations, field.name
    # The starter's spellings.
    args = parser.parse_args(["--batch_size", "8", "--sst_train", "s.csv", "--option", "pretrain", "--use_gpu",
                              "--hidden_dropout_prob", "0.2", "--sts_test_out", "o.csv"])
    settings = settings_from_args(args)
    assert settings == {"batch_size": 8, "files": {"sst_train": "s.csv"}, "option": "pretrain", "use_gpu": True,
                        "hidden_dropout_prob": 0.2, "prediction_files": {"sts_test_out": "o.csv"}}
    monkeypatch.setenv("MTBERT_DATA", "/somewhere")
    assert config_for_new_run({}).data == "/somewhere" and config_for_new_run({"data": "d"}).data == "d"


def test_import_mtbert_optim_does_not_load_the_encoder():
    code = ("import sys, mtbert.optim; loaded = [m for m in ('mtbert.model', 'mtbert.tokenizer', 'mtbert.kernels', "
            "'transformers', 'triton') if m in sys.modules]; assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_lazy_names_stay_the_functions_and_classes():
    import mtbert
    import mtbert.encode  # noqa: F401 (loading the submodule must not replace the function)
    import mtbert.multitask.model

    assert callable(mtbert.encode) and mtbert.encode.__name__ == "encode"
    assert mtbert.MultitaskBert is mtbert.multitask.model.MultitaskBert and mtbert.BertModel.__name__ == "BertModel"
    with pytest.raises(AttributeError, match="no attribute 'Encoder'"):
        mtbert.Encoder


def test_missing_huggingface_hub_is_a_model_not_found_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails with ImportError
    with pytest.raises(MissingFileError, match="huggingface_hub is not installed"):
        resolve_model_dir("some-org/some-bert")


def test_the_attention_ab_script_imports_the_suites_it_reuses():
    """benchmarks/cpu_varlen_attention_ab.py imports bench_encoder's and bench_multitask_step's
    helpers by name: --help (parsed after the imports) fails when a renamed helper breaks it."""
    script = REPO / "benchmarks" / "cpu_varlen_attention_ab.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--repeats" in result.stdout
