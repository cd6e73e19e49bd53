"""The training loop and CLI on tiny synthetic data with a tiny random encoder: flags parse, every
option trains with finite losses, the loss goes down, resume equals an uninterrupted run, the
prediction files and the plot are written."""
import json
import warnings

import pytest
import torch

from mtbert.data import DEFAULT_FILES, load_task_file
from mtbert.multitask import checkpoint as checkpoints
from mtbert.multitask import trainer as trainer_module
from mtbert.multitask.evaluate import PREDICTION_COLUMNS
from mtbert.multitask.plot import main as plot_main
from mtbert.multitask.trainer import Trainer, TrainConfig, epoch_plan, task_probabilities
from mtbert.train import build_parser, config_for_new_run, settings_from_args
from mtbert.train import main as train_main


def _config(tiny_model_dir, toy_data, out, **overrides):
    settings = dict(data=str(toy_data), out=str(out), model=str(tiny_model_dir), epochs=1, batch_size=16,
                    lr=1e-3, hidden_dropout_prob=0.1, max_length=32, progress=False, log_every=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def parse_config(argv):
    return config_for_new_run(settings_from_args(build_parser().parse_args(argv)))


def _records(out, kind):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == kind]


# -- command line --------------------------------------------------------------------------------

def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--option", "--fine-tune-mode", "--sst_train", "--para_dev", "--sts_test", "--grad-method",
                 "--para-head", "--sts-loss", "--task-sampling", "--passes", "--resume", "--bf16", "--use_gpu", "--out"):
        assert flag in text


def test_flags_parse_into_the_config():
    config = parse_config([
        "--data", "d", "--sst_train", "x.csv", "--para_test_out", "p.csv", "--fine-tune-mode", "last-linear-layer",
        "--para-head", "cross", "--sts-head", "cosine", "--sts-loss", "cosent", "--grad-method", "main-aux",
        "--main-task", "sts", "--aux-weight", "0.5", "--task-sampling", "annealed", "--schedule", "linear",
        "--warmup", "0.1", "--weight-decay", "0.01", "--max-length", "64", "--no-bucket", "--tasks", "sst,sts",
        "--batch_size", "8", "--seed", "3", "--pooling", "cls", "--loss-weights", "sts=0.05, sst=2",
        "--passes", "per-task"])
    assert (config.option, config.lr) == ("pretrain", 1e-3)  # the alias, and the starter's lr advice
    assert (config.para_head, config.sts_head, config.sts_loss) == ("cross", "cosine", "cosent")
    assert (config.grad_method, config.main_task, config.aux_weight) == ("main-aux", "sts", 0.5)
    assert (config.task_sampling, config.schedule, config.warmup, config.weight_decay) == ("annealed", "linear", 0.1, 0.01)
    assert (config.max_length, config.bucket, config.tasks, config.batch_size, config.seed) == (64, False, ("sst", "sts"), 8, 3)
    assert config.loss_weights == {"sts": 0.05, "sst": 2.0} and config.passes == "per-task"
    assert str(config.file("sst", "train")) == "x.csv" and str(config.file("sts", "dev")) == "d/sts-dev.csv"
    assert str(config.prediction_file("para", "test")) == "p.csv"
    defaults = parse_config([])
    assert (defaults.option, defaults.lr, defaults.seed, defaults.grad_method, defaults.passes) == (
        "finetune", 1e-5, 11711, "sum", "packed")
    with pytest.raises(ValueError, match="main_task"):
        TrainConfig(tasks=("sst", "para"), grad_method="main-aux", main_task="sts")
    for bad in (["--sts-loss", "hinge"], ["--loss-weights", "sentiment=2"], ["--loss-weights", "sts"],
                ["--loss-weights", "sts=small"], ["--passes", "one"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    with pytest.raises(ValueError, match="passes must be one of"):
        TrainConfig(passes="one")
    with pytest.raises(ValueError, match="loss_weights names 'para'"):
        TrainConfig(tasks=("sst", "sts"), loss_weights={"para": 1.0})
    with pytest.raises(ValueError, match=r"loss_weights\['sts'\] must be a positive"):
        TrainConfig(loss_weights={"sts": 0.0})


def test_task_sampling_plans():
    sizes = {"sst": 4, "para": 10, "sts": 2}
    tasks = ("sst", "para", "sts")
    assert epoch_plan(tasks, sizes, "round-robin", 0, 3, 0) == [list(tasks)] * 10
    proportional = epoch_plan(tasks, sizes, "proportional", 0, 3, 0)
    assert len(proportional) == 6 and all(len(step) == 3 for step in proportional)
    assert task_probabilities([4, 10, 2], "proportional", 0, 3) == pytest.approx([0.25, 0.625, 0.125])
    # Annealed (Stickland & Murray): α = 1 − 0.8·e/(E − 1) for 0-based epoch e: proportional first, then flatter.
    assert task_probabilities([4, 10, 2], "annealed", 0, 3) == pytest.approx([0.25, 0.625, 0.125])
    last = task_probabilities([4, 10, 2], "annealed", 2, 3)
    weights = [n ** 0.2 for n in (4, 10, 2)]
    assert last == pytest.approx([w / sum(weights) for w in weights])


# -- training ------------------------------------------------------------------------------------

COMBINATIONS = [
    dict(para_head="concat", sts_head="concat", sts_loss="mse", option="pretrain"),
    dict(para_head="cosine", sts_head="cosine", sts_loss="cosine-mse", pooling="cls"),
    dict(para_head="sbert", sts_head="sbert", sts_loss="ce", grad_method="pcgrad", task_sampling="proportional"),
    dict(para_head="cross", sts_head="cross", sts_loss="cosent", grad_method="main-aux", task_sampling="annealed",
         schedule="cosine", warmup=0.2, weight_decay=0.01),
    dict(para_head="sbert", sts_head="cosine", sts_loss="mse", tasks=("sts",), bucket=False),
]


@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_option_trains_with_finite_losses(tiny_model_dir, toy_data, tmp_path, options):
    config = _config(tiny_model_dir, toy_data, tmp_path, max_train_examples=32, max_dev_examples=12, **options)
    trainer = Trainer(config)
    frozen = {name: p.detach().clone() for name, p in trainer.model.encoder.named_parameters()}
    scores = trainer.fit()
    losses = [value for record in _records(tmp_path, "train") for value in record["loss"].values()]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert all(0.0 <= scores[k] <= 1.0 for k in scores if k.endswith("acc"))
    if config.option == "pretrain":
        assert all(torch.equal(p, frozen[name]) for name, p in trainer.model.encoder.named_parameters())
    else:
        assert not all(torch.equal(p, frozen[name]) for name, p in trainer.model.encoder.named_parameters())


@pytest.mark.parametrize("passes", ["packed", "per-task"])
def test_logged_loss_is_the_mean_per_batch_when_a_task_is_drawn_twice(tiny_model_dir, toy_data, tmp_path, passes):
    config = _config(tiny_model_dir, toy_data, tmp_path, batch_size=4, max_train_examples=24, max_dev_examples=4,
                     task_sampling="proportional", passes=passes, log_every=1)
    trainer = Trainer(config)
    batch_losses, compute_loss = [], trainer.model.loss

    def recording_loss(task, scores, labels):
        loss = compute_loss(task, scores, labels)
        batch_losses.append((trainer.global_step + 1, task, loss.item()))
        return loss

    trainer.model.loss = recording_loss
    trainer.fit()
    records = _records(tmp_path, "train")
    assert any(sum(1 for step, t, _ in batch_losses if step == r["step"] and t == task) > 1
               for r in records for task in r["loss"])  # some step drew a task twice
    for record in records:
        for task, logged in record["loss"].items():
            values = [value for step, t, value in batch_losses if step == record["step"] and t == task]
            assert logged == pytest.approx(sum(values) / len(values), rel=1e-6)


def _parse_predictions(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], [line.rsplit(" , ", 1) for line in lines[1:]]
    return header, {example_id: float(value) for example_id, value in rows}


def test_loss_decreases_and_outputs_are_written(tiny_model_dir, toy_data, tmp_path):
    config = _config(tiny_model_dir, toy_data, tmp_path, epochs=3, lr=3e-3, log_every=6)
    scores = Trainer(config).fit()
    train = _records(tmp_path, "train")
    for task in ("sst", "para", "sts"):
        assert train[-1]["loss"][task] < train[0]["loss"][task], task
    assert len(_records(tmp_path, "val")) == 3 and _records(tmp_path, "final")[0]["overall"] == scores["overall"]
    for task in ("sst", "para", "sts"):
        for split in ("dev", "test"):
            header, predictions = _parse_predictions(tmp_path / "predictions" / f"{task}-{split}-output.csv")
            assert header == f"id \t {PREDICTION_COLUMNS[task]} "
            inputs = load_task_file(task, toy_data / DEFAULT_FILES[(task, split)])
            assert set(predictions) == {e.id for e in inputs.examples}
            if task == "sst":
                assert set(predictions.values()) <= {0, 1, 2, 3, 4}
            if task == "para":
                assert set(predictions.values()) <= {0.0, 1.0}
    padding = _records(tmp_path, "padding")
    assert len(padding) == 3 and all(0.0 <= padding[0][t] < 0.5 for t in ("sst", "para", "sts"))
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(tmp_path), "--output", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000
    best = checkpoints.load_checkpoint(tmp_path / "best.pt")
    assert best["scores"]["overall"] == pytest.approx(max(r["overall"] for r in _records(tmp_path, "val")))


class _Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted_run(tiny_model_dir, toy_data, tmp_path):
    # PCGrad (its random projection order), proportional sampling (the drawn task slots) and
    # dropout all draw random numbers, so the resumed run must restore every random state.
    options = dict(epochs=2, batch_size=16, max_train_examples=96, max_dev_examples=12, save_every=3,
                   grad_method="pcgrad", task_sampling="proportional", hidden_dropout_prob=0.2)
    reference = Trainer(_config(tiny_model_dir, toy_data, tmp_path / "reference", **options))
    reference_scores = reference.fit()

    def kill_at_step_5(trainer):  # the checkpoint of step 3 survives; steps 4 and 5 are lost
        if trainer.global_step == 5:
            raise _Killed

    killed_out = tmp_path / "killed"
    with pytest.raises(_Killed):
        Trainer(_config(tiny_model_dir, toy_data, killed_out, **options), on_step=kill_at_step_5).fit()
    state = checkpoints.load_checkpoint(killed_out / "last.pt")
    assert (state["global_step"], state["epoch"]) == (3, 0)
    resumed = Trainer(_config(tiny_model_dir, toy_data, killed_out, **options))
    resumed.load_state_dict(state)
    resumed_scores = resumed.fit()

    final_reference = checkpoints.load_checkpoint(tmp_path / "reference" / "last.pt")["model"]
    final_resumed = checkpoints.load_checkpoint(killed_out / "last.pt")["model"]
    for name, value in final_reference.items():
        assert torch.equal(value, final_resumed[name]), name
    assert resumed_scores == reference_scores
    # Training time carries over the kill: the resumed run counts on from the checkpoint's.
    assert resumed.train_seconds > state["train_seconds"] > 0
    minutes = [r["train_minutes"] for r in _records(killed_out, "val")]
    assert len(minutes) == 2 and 0 < minutes[0] < minutes[1] == pytest.approx(resumed.train_seconds / 60)
    strip = [{k: v for k, v in r.items() if k != "examples_per_s"} for r in _records(tmp_path / "reference", "train")]
    assert strip == [{k: v for k, v in r.items() if k != "examples_per_s"} for r in _records(killed_out, "train")]


def test_non_finite_loss_skips_the_step(tiny_model_dir, toy_data, tmp_path):
    trainer = Trainer(_config(tiny_model_dir, toy_data, tmp_path, max_train_examples=48))
    original_loss, calls = trainer.model.loss, []

    def poisoned(task, scores, labels):
        calls.append(task)
        loss = original_loss(task, scores, labels)
        return loss * float("nan") if len(calls) == 5 else loss  # step 2, para

    trainer.model.loss = poisoned
    before = {}

    def snapshot(t):
        before[t.global_step] = [p.detach().clone() for p in t.model.parameters()]

    trainer.on_step = snapshot
    with pytest.warns(UserWarning, match="non-finite para loss at step 1"):
        trainer.fit()
    assert trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before[1], before[2]))  # the skipped step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(before[2], before[3]))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    target = checkpoints.save_checkpoint({"step": 1}, tmp_path / "last.pt")

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        checkpoints.load_checkpoint(tmp_path / "nothing.pt")


def test_cli_runs_on_synthetic_data_when_data_is_missing(tiny_model_dir, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = train_main(["--data", str(tmp_path / "no-data"), "--synthetic-if-missing", "--model",
                           str(tiny_model_dir), "--epochs", "1", "--batch_size", "16", "--lr", "1e-3",
                           "--max-train-examples", "32", "--max-dev-examples", "16", "--out", str(tmp_path / "run"),
                           "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC sanity data" in printed and "| SST acc |" in printed
    assert (tmp_path / "run" / "synthetic-data" / "quora-train.csv").is_file()
    assert (tmp_path / "run" / "predictions" / "sts-test-output.csv").is_file()
    assert train_main(["--data", str(tmp_path / "no-data"), "--model", str(tiny_model_dir),
                       "--out", str(tmp_path / "x")]) == 2
    assert "ids-sst-train.csv does not exist" in capsys.readouterr().err


def test_task_rows_sum_to_the_plain_autograd_gradient(tiny_model_dir, toy_data, tmp_path):
    """Each task back-propagates into its own row; "sum" gives exactly what autograd gives for the
    summed loss, with every head's segment holding only its own task's gradient."""
    from mtbert.data import collate
    from mtbert.multitask.model import MultitaskBert
    from mtbert.multitask.optimization import GradientPath
    from mtbert.tokenizer import Tokenizer

    config = _config(tiny_model_dir, toy_data, tmp_path)
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    plain = MultitaskBert.from_pretrained(tiny_model_dir).eval()  # no dropout: both see the same function
    flat_model = MultitaskBert.from_pretrained(tiny_model_dir).eval()
    flat_model.load_state_dict(plain.state_dict())
    path = GradientPath(flat_model, config)
    path.zero_grad()
    total = 0.0
    for task in ("sst", "para", "sts"):
        examples = load_task_file(task, toy_data / DEFAULT_FILES[(task, "train")]).examples[:6]
        batch = collate(examples, tokenizer, "separate")
        total = total + plain.loss(task, plain(task, batch["inputs"]), batch["labels"])
        path.backward(task, flat_model.loss(task, flat_model(task, batch["inputs"]), batch["labels"]))
    total.backward()
    path.flat.combine("sum")
    for (name, p), q in zip(plain.named_parameters(), flat_model.parameters()):
        expected = torch.zeros_like(p) if p.grad is None else p.grad  # the unused [CLS] pooler has none
        torch.testing.assert_close(q.grad, expected, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    rows = dict(zip(path.flat.task_names, path.flat.grads))
    for task in ("sst", "para", "sts"):
        for other, head in flat_model.heads.items():
            begin, end = path.flat.span(next(head.parameters()))
            assert bool(rows[task][begin:end].any()) == (task == other)


def test_loss_weight_scales_only_its_tasks_gradient_row(tiny_model_dir, toy_data, tmp_path):
    """--loss-weights sts=w: the STS row of the gradient buffer is exactly w times the unweighted
    run's, the other rows are unchanged, and the logged loss stays the unweighted one."""
    rows, losses = {}, {}
    for weight in (1.0, 0.25):
        trainer = Trainer(_config(tiny_model_dir, toy_data, tmp_path / str(weight), hidden_dropout_prob=0.0,
                                  loss_weights={"sts": weight}))
        trainer.gradients.step = trainer.scheduler.step = lambda: None  # only the rows are compared
        losses[weight], _ = trainer.train_step(("sst", "para", "sts"))
        rows[weight] = dict(zip(trainer.gradients.flat.task_names, trainer.gradients.flat.grads.clone()))
    assert losses[1.0] == pytest.approx(losses[0.25], rel=1e-6)
    torch.testing.assert_close(rows[0.25]["sts"], 0.25 * rows[1.0]["sts"], rtol=1e-5, atol=1e-9)
    assert rows[1.0]["sts"].abs().max() > 0
    for task in ("sst", "para"):
        torch.testing.assert_close(rows[0.25][task], rows[1.0][task], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kernels, pair_head, batch_size, bf16", [
    ("torch", "sbert", 8, False), ("torch", "cross", 8, False), ("torch", "sbert", 8, True),
    ("auto", "sbert", 8, True),  # the fused CPU kernels, segmented, under bf16 autocast
    ("triton", "sbert", 1, False)])  # the interpreter is slow
def test_packed_pass_fills_the_rows_of_the_per_task_passes(tiny_model_dir, toy_data, tmp_path, monkeypatch, kernels,
                                                           pair_head, batch_size, bf16):
    """--passes packed runs one encoder forward and one backward per step (per-task: one per task
    slot) and, with dropout off, fills every gradient row as the per-task passes (PyTorch kernels,
    the reference) do, a task drawn twice (its two batches share its row) and a loss weight
    included; also under bf16 autocast (both modes; packed with the PyTorch ops and with the fused
    CPU kernels)."""
    tasks = ("sst", "para", "sts", "para")
    rows, passes = {}, {}
    for mode, mode_kernels in (("packed", kernels), ("per-task", "torch")):
        monkeypatch.setenv("MTBERT_KERNELS", mode_kernels)
        trainer = Trainer(_config(tiny_model_dir, toy_data, tmp_path / mode, passes=mode, para_head=pair_head,
                                  sts_head=pair_head, loss_weights={"sts": 0.5}, batch_size=batch_size,
                                  select_on="dev"))  # every training row: 96 make full batches
        trainer.model.eval()  # no dropout: both modes compute the same function
        if bf16:
            trainer._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        trainer.gradients.step = trainer.scheduler.step = lambda: None  # only the rows are compared
        counts = passes[mode] = {"forward": 0, "backward": 0}

        def count_passes(module, args, output):
            counts["forward"] += 1
            output.register_hook(lambda grad: counts.__setitem__("backward", counts["backward"] + 1))

        trainer.model.encoder.embeddings.register_forward_hook(count_passes)
        losses, examples = trainer.train_step(tasks)
        assert set(losses) == {"sst", "para", "sts"} and examples == 4 * batch_size
        rows[mode] = trainer.gradients.flat.grads.clone()
    assert passes == {"packed": {"forward": 1, "backward": 1}, "per-task": {"forward": 4, "backward": 4}}
    assert all(bool(row.any()) for row in rows["packed"])
    if bf16:  # a task drawn twice has its bf16 weight gradient rounded once, not twice (7e-4 seen)
        error = (rows["packed"] - rows["per-task"]).norm(dim=1) / rows["per-task"].norm(dim=1)
        assert (error < 1e-2).all(), error  # a wrongly routed gradient is off by O(1)
        return
    scale = rows["per-task"].abs().max()
    torch.testing.assert_close(rows["packed"], rows["per-task"], rtol=1e-5, atol=1e-5 * scale)


# -- bfloat16 on the CPU -------------------------------------------------------------------------

def _record_encoder_dtypes(trainer):
    """Appends the dtype of every encoder forward's last attention output (training, evaluation,
    prediction): its matmuls' dtype."""
    dtypes = []
    trainer.model.encoder.encoder.layer[-1].attention.self.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype))
    return dtypes


def test_bf16_trains_on_the_cpu_with_float32_master_weights(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    """--bf16 forced on any CPU: training, dev evaluation and test prediction all run in bfloat16
    autocast; parameters, gradient rows and AdamW state stay float32; losses are finite."""
    monkeypatch.setenv(trainer_module.FORCE_CPU_BF16_ENV, "1")
    monkeypatch.setattr(trainer_module, "cpu_has_bf16_units", lambda: False)
    trainer = Trainer(_config(tiny_model_dir, toy_data, tmp_path, bf16=True, grad_method="pcgrad",
                              max_train_examples=48))
    dtypes = _record_encoder_dtypes(trainer)
    trainer.fit()
    assert trainer.bf16 and dtypes and set(dtypes) == {torch.bfloat16}
    losses = [value for record in _records(tmp_path, "train") for value in record["loss"].values()]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    flat = trainer.gradients.flat
    assert flat.is_intact() and {flat.params.dtype, flat.grads.dtype, trainer.optimizer.exp_avg.dtype} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    dtypes.clear()
    trainer.finish()  # the dev predictions are cached: its forwards predict the test files
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_bf16_gradients_close_to_float32(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    """One step's task gradient rows and their PCGrad combination (Gram in float64) under bfloat16
    autocast, against float32 from the same weights and batches: within bfloat16's precision."""
    monkeypatch.setenv(trainer_module.FORCE_CPU_BF16_ENV, "1")
    rows, combined, losses = {}, {}, {}
    for bf16 in (False, True):
        trainer = Trainer(_config(tiny_model_dir, toy_data, tmp_path / str(bf16), bf16=bf16, hidden_dropout_prob=0.0,
                                  grad_method="pcgrad"))
        trainer.optimizer.step = trainer.scheduler.step = lambda: None  # combine, but keep the weights
        dtypes = _record_encoder_dtypes(trainer)
        losses[bf16], _ = trainer.train_step(("sst", "para", "sts"))
        assert set(dtypes) == {torch.bfloat16 if bf16 else torch.float32}
        flat = trainer.gradients.flat
        rows[bf16], combined[bf16] = flat.grads.clone(), flat.grad.clone()
    assert rows[True].dtype == combined[True].dtype == torch.float32
    for task in ("sst", "para", "sts"):
        assert losses[True][task] == pytest.approx(losses[False][task], rel=2e-2), task
    for k in range(3):
        error = (rows[True][k] - rows[False][k]).norm() / rows[False][k].norm()
        assert error < 3e-2, f"row {k}: relative error {error:.3f}"
    assert (combined[True] - combined[False]).norm() / combined[False].norm() < 3e-2


def test_bf16_without_cpu_units_warns_and_trains_in_float32(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    monkeypatch.delenv(trainer_module.FORCE_CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(trainer_module, "cpu_has_bf16_units", lambda: False)
    with pytest.warns(UserWarning, match="training in float32"):
        trainer = Trainer(_config(tiny_model_dir, toy_data, tmp_path, bf16=True, max_train_examples=16))
    dtypes = _record_encoder_dtypes(trainer)
    trainer.train_step(("sst",))
    assert not trainer.bf16 and dtypes == [torch.float32]


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx2 avx512f avx512_bf16", True),
    ("fpu sse avx2 amx_bf16 amx_tile", True),
    ("fpu sse avx2 avx512f avx512_vnni", False),
])
def test_cpu_bf16_units_are_read_from_cpuinfo(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU bf16\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert trainer_module.cpu_has_bf16_units(cpuinfo) is expected
    assert trainer_module.cpu_has_bf16_units(tmp_path / "missing") is False
