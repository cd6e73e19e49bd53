"""Data-parallel training under torch.distributed (gloo, CPU): 2 and 3 processes train exactly as
one process does on the same global batches, each forwarding only its share and holding about P/N
of the optimizer state; the all-reduced partial Grams are the Gram of the gathered rows;
checkpoints saved with 2 ranks resume with 1 and 2; a failing rank ends the job with its error.

The processes are spawned once per world size (a module fixture) and run every scenario in turn;
each rank saves what it saw, the tests compare it with a single-process run here."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtbert import distributed
from mtbert.multitask.checkpoint import load_checkpoint
from mtbert.multitask.trainer import Trainer, TrainConfig, TrainingStopped
from mtbert.optim import FlatParameters, METHODS, _ops

STEPS = 5
SAVED_AFTER = 2
FAILURE = "rank 1 fails mid-step on purpose"


def _config(setup, out, **overrides):
    # 40 examples per task in batches of 16: batches of 16, 16 and 8, none divisible by 3.
    settings = dict(data=setup["data"], model=setup["model"], out=str(out), epochs=1, batch_size=16, lr=1e-3,
                    hidden_dropout_prob=0.0, max_length=32, progress=False, max_train_examples=40,
                    max_dev_examples=11, save_every=0)
    return TrainConfig(**{**settings, **overrides})


def _trainer(setup, out, on_step=None, **overrides):
    """A Trainer without dropout: --hidden_dropout_prob 0 and eval mode, as the encoder's attention
    dropout comes from its checkpoint (ranks that draw different masks train differently)."""
    trainer = Trainer(_config(setup, out, **overrides), on_step=on_step)
    trainer.model.eval()
    return trainer


def _combined_gradient(trainer):
    """The full combined gradient of the last step (gathered from the shards under torch.distributed)."""
    flat = trainer.gradients.flat
    if not distributed.is_distributed():
        return flat.grad.clone()
    begin, end = trainer.gradients.sharded.shard
    return trainer.gradients.sharded.gather_shards(flat.grad[begin:end]).clone()


def _train(trainer, steps, evaluate=False):
    for _ in range(steps):
        trainer.train_step(list(trainer.config.tasks))
    flat = trainer.gradients.flat
    # Parameter by parameter: the buffers' padding differs with the number of processes.
    spans = [flat.span(p) for p in flat.parameters()]
    gradient = _combined_gradient(trainer)
    trained = {"params": torch.cat([flat.params[begin:end] for begin, end in spans]),
               "tensors": [flat.params[begin:end].clone() for begin, end in spans],
               "grad": torch.cat([gradient[begin:end] for begin, end in spans])}
    if evaluate:  # under torchrun each rank predicts its share of the dev examples
        trained["dev"] = trainer.evaluate()
    return trained


def _gram_of_gathered_rows(rank, world):
    """Random rows on each rank; the all-reduced Gram of the reduce-scattered shards against the
    float64 Gram of the gathered summed rows."""
    torch.manual_seed(0)
    shared, heads = torch.nn.Parameter(torch.zeros(531)), [torch.nn.Parameter(torch.zeros(n)) for n in (30, 17, 5)]
    flat = FlatParameters(shared=[shared], tasks={name: [p] for name, p in zip("abc", heads)},
                          numel_multiple=world * 16)
    flat.grads.copy_(torch.randn(flat.grads.shape, generator=torch.Generator().manual_seed(rank)))
    sharded = distributed.ShardedRows(flat)
    sharded.reduce_scatter()
    gram = sharded.all_reduce_gram(_ops.gradient_gram(sharded.rows, sharded.boundaries))
    rows = torch.stack([sharded.gather_shards(row) for row in sharded.rows])
    b = flat.boundaries
    reference = torch.stack([rows[:, b[c]:b[c + 1]].double() @ rows[:, b[c]:b[c + 1]].double().T
                             for c in range(len(b) - 1)])
    summed = sum(torch.randn(flat.grads.shape, generator=torch.Generator().manual_seed(r)) for r in range(world))
    return {"gram": gram, "gram_reference": reference, "rows": rows, "rows_summed": summed}


# Every torch.distributed collective a step could call.
COLLECTIVES = ("all_reduce", "reduce_scatter_single", "all_gather_single", "reduce_scatter_tensor",
               "all_gather_into_tensor", "reduce_scatter", "all_gather", "broadcast", "broadcast_object_list",
               "all_gather_object", "barrier", "reduce", "gather", "scatter")


def _counted_step(setup, out):
    """One pcgrad step with every torch.distributed collective and every example forwarded counted."""
    trainer = _trainer(setup, out, grad_method="pcgrad")
    examples, calls = [], {}
    task_loss = trainer.model.loss

    def counted_loss(task, scores, labels):
        examples.append(len(labels))
        return task_loss(task, scores, labels)

    def counted(name, collective):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return collective(*args, **kwargs)
        return call

    trainer.model.loss = counted_loss
    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    for name, collective in originals.items():
        setattr(dist, name, counted(name, collective))
    try:
        _, global_examples = trainer.train_step(list(trainer.config.tasks))
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
    return {"collectives": calls, "examples": sum(examples), "global_examples": global_examples,
            "state_numel": trainer.optimizer.exp_avg.numel(), "numel": trainer.gradients.flat.numel,
            "tasks": trainer.gradients.flat.num_tasks}


def _worker(rank, world, port, setup, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.init_process_group(torch.device("cpu"), timeout_s=60)
    seen = {"gram": _gram_of_gathered_rows(rank, world), "counted": _counted_step(setup, results / f"count{world}")}
    for method in METHODS:
        seen[method] = _train(_trainer(setup, results / f"{method}{world}", grad_method=method), STEPS,
                              evaluate=method == "pcgrad")
    if world == 2:
        seen["accumulated"] = _train(_trainer(setup, results / "accumulated2", grad_method="pcgrad", grad_accum=3),
                                     STEPS)
        out = results / "saved-by-2"
        trainer = _trainer(setup, out, grad_method="pcgrad")
        _train(trainer, SAVED_AFTER)
        trainer.save()
        seen["continued"] = _train(trainer, STEPS - SAVED_AFTER)
        dist.barrier()  # rank 0 has written last.pt
        resumed = _trainer(setup, out, grad_method="pcgrad")
        resumed.load_state_dict(load_checkpoint(out / "last.pt"))
        seen["resumed"] = _train(resumed, STEPS - SAVED_AFTER)
    if world == 2:  # a non-finite loss on rank 1 alone: both ranks skip that step
        trainer = _trainer(setup, results / "non-finite")
        task_loss, calls = trainer.model.loss, []

        def non_finite_once(task, scores, labels):
            calls.append(task)
            loss = task_loss(task, scores, labels)
            return loss * float("nan") if rank == 1 and len(calls) == 1 else loss
        trainer.model.loss = non_finite_once
        with pytest.warns(UserWarning, match="non-finite") if rank == 1 else contextlib.nullcontext():
            skipped, _ = trainer.train_step(list(trainer.config.tasks))
        taken, _ = trainer.train_step(list(trainer.config.tasks))
        seen["non_finite"] = {"skipped": skipped, "taken": taken, "skipped_steps": trainer.skipped_steps,
                              "params": trainer.gradients.flat.params.clone()}
    if world == 2:  # rank 1 alone is asked to stop after step 1: both stop after step 2, the next all-reduce
        def ask_rank_1_to_stop(trainer):
            if rank == 1 and trainer.global_step == 1:
                trainer.request_stop("SIGTERM")
        try:
            _trainer(setup, results / "stopped", epochs=2, on_step=ask_rank_1_to_stop).fit()
        except TrainingStopped as stopped:
            seen["stopped"] = (stopped.global_step, str(stopped.checkpoint))
    torch.save(seen, results / f"rank{rank}-of-{world}.pt")
    if world == 2:  # last: rank 1 raises inside a step while rank 0 waits for it in a collective
        trainer = _trainer(setup, results / "failing")
        if rank == 1:
            def fail(*args):
                raise ValueError(FAILURE)
            trainer.model.loss = fail
        trainer.train_step(list(trainer.config.tasks))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, toy_data, tmp_path_factory):
    """{world size: [what each rank saw]}, 1 being this process, and the failure's (error, seconds)."""
    results = tmp_path_factory.mktemp("distributed")
    setup = {"data": str(toy_data), "model": str(tiny_model_dir)}
    single = {method: _train(_trainer(setup, results / f"{method}1", grad_method=method), STEPS,
                             evaluate=method == "pcgrad")
              for method in METHODS}
    single["accumulated"] = _train(_trainer(setup, results / "accumulated1", grad_method="pcgrad", grad_accum=2),
                                   STEPS)
    resumed = _trainer(setup, results / "resumed-by-1", grad_method="pcgrad")
    seen = {1: [single]}
    mp.spawn(_worker, args=(3, _free_port(), setup, results), nprocs=3)
    started = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException) as failure:
        mp.spawn(_worker, args=(2, _free_port(), setup, results), nprocs=2)
    seconds = time.perf_counter() - started
    resumed.load_state_dict(load_checkpoint(results / "saved-by-2" / "last.pt"))
    single["resumed"] = _train(resumed, STEPS - SAVED_AFTER)
    for world in (2, 3):
        seen[world] = [torch.load(results / f"rank{r}-of-{world}.pt", weights_only=False) for r in range(world)]
    return {"seen": seen, "failure": (str(failure.value), seconds),
            "stopped_checkpoint": results / "stopped" / "last.pt"}


@pytest.mark.parametrize("numel,world_size", [(16, 1), (1000, 2), (1000, 3), (48, 4), (32, 3)])
def test_column_shards_are_aligned_and_cover_the_buffer(numel, world_size):
    shards = distributed.column_shards(numel, world_size)
    assert shards[0][0] == 0 and shards[-1][1] == numel
    assert all(end == begin for (_, end), (begin, _) in zip(shards, shards[1:]))
    width = shards[0][1] - shards[0][0]
    assert width % 16 == 0 and numel <= width * world_size < numel + 16 * world_size  # equal chunks, least padding
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        distributed.column_shards(numel, 0)


def test_shard_boundaries_clip_the_segments_to_the_shard():
    # segments [0, 40) shared, [40, 56), [56, 64), [64, 80) heads; the shard [48, 80) padded to 48 columns
    assert distributed.shard_boundaries([0, 40, 56, 64, 80], 48, 48) == [0, 0, 8, 16, 48]
    assert distributed.shard_boundaries([0, 40, 56, 64, 80], 0, 48) == [0, 40, 48, 48, 48]


def test_bad_process_group_settings_name_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        distributed.init_process_group(torch.device("cpu"), "mpi")
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        distributed.init_process_group(torch.device("cpu"), "gloo", timeout_s=0)


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_ranks_train_exactly_as_one_process(runs, world, method):
    reference = runs["seen"][1][0][method]
    for rank, seen in enumerate(runs["seen"][world]):
        assert _relative(seen[method]["params"], reference["params"]) < 1e-6, rank
        # Tensor by tensor, 5e-6: a tensor that started at zero (a head's bias) is five Adam steps
        # of about lr each, which the float32 order of the reduce-scatter's sums moves by up to
        # 2.3e-6 of its norm (measured: main-aux, 3 processes; sum and PCGrad: every tensor within 3.8e-7).
        for index, (tensor, expected) in enumerate(zip(seen[method]["tensors"], reference["tensors"])):
            assert (tensor - expected).norm() <= 5e-6 * expected.norm(), (rank, index)
        assert _relative(seen[method]["grad"], reference["grad"]) < 1e-6, rank
        assert torch.equal(seen[method]["params"], runs["seen"][world][0][method]["params"])  # all-gathered


@pytest.mark.parametrize("world", [2, 3])
def test_dev_evaluation_is_sharded_and_gathered_in_order(runs, world):
    scores, predictions = runs["seen"][1][0]["pcgrad"]["dev"]
    for seen in runs["seen"][world]:
        rank_scores, rank_predictions = seen["pcgrad"]["dev"]
        assert rank_scores.keys() == scores.keys()
        for task, expected in predictions.items():
            assert rank_predictions[task].shape == expected.shape == (11,)
            torch.testing.assert_close(rank_predictions[task], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2])
def test_accumulated_micro_batches_train_as_whole_batches(runs, world):
    reference = runs["seen"][1][0]["pcgrad"]
    for seen in runs["seen"][world]:
        assert _relative(seen["accumulated"]["params"], reference["params"]) < 1e-6
        assert _relative(seen["accumulated"]["grad"], reference["grad"]) < 1e-6


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_forwards_its_share_and_holds_its_shard_of_the_optimizer_state(runs, world):
    counted = [seen["counted"] for seen in runs["seen"][world]]
    global_batch = counted[0]["global_examples"]
    assert sum(c["examples"] for c in counted) == global_batch
    assert all(c["examples"] <= -(-global_batch // world) + 3 for c in counted)  # a share of each task's batch
    for c in counted:
        # a reduce-scatter per row, all-reduce of the Gram and of the step's losses, all-gather of the parameters
        assert c["collectives"] == {"reduce_scatter": c["tasks"], "all_reduce": 2, "all_gather_single": 1}
        assert c["numel"] / world - 16 <= c["state_numel"] <= c["numel"] / world + 16
    assert sum(c["state_numel"] for c in counted) == counted[0]["numel"]


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduced_partial_grams_equal_the_gram_of_the_gathered_rows(runs, world):
    for seen in runs["seen"][world]:
        gram = seen["gram"]
        torch.testing.assert_close(gram["rows"], gram["rows_summed"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gram["gram"], gram["gram_reference"], rtol=1e-12, atol=1e-12)


def test_checkpoint_saved_by_two_ranks_resumes_with_one_and_with_two(runs):
    uninterrupted = runs["seen"][1][0]["pcgrad"]["params"]
    assert _relative(runs["seen"][1][0]["resumed"]["params"], uninterrupted) < 1e-6
    for seen in runs["seen"][2]:
        assert _relative(seen["continued"]["params"], uninterrupted) < 1e-6
        assert _relative(seen["resumed"]["params"], uninterrupted) < 1e-6


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(runs):
    ranks = [seen["non_finite"] for seen in runs["seen"][2]]
    assert all(r["skipped"] is None and r["skipped_steps"] == 1 for r in ranks)
    assert ranks[0]["taken"] == ranks[1]["taken"] and set(ranks[0]["taken"]) == {"sst", "para", "sts"}
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


def test_a_stop_request_to_one_rank_stops_every_rank_after_the_same_step(runs):
    assert [seen.get("stopped") for seen in runs["seen"][2]] == [(2, str(seen_out)) for seen_out in
                                                                   [runs["stopped_checkpoint"]] * 2]
    assert load_checkpoint(runs["stopped_checkpoint"])["global_step"] == 2


def test_a_failing_rank_ends_the_job_with_its_error(runs):
    message, seconds = runs["failure"]
    assert FAILURE in message and "ValueError" in message
    assert seconds < 60


def test_torchrun_cli_trains_with_rank_0_alone_writing(tiny_model_dir, tmp_path):
    """``torchrun --nproc_per_node 2 -m mtbert.train`` on the synthetic set (which rank 0 writes and
    the other reads)."""
    out = tmp_path / "run"
    flags = ["--model", str(tiny_model_dir), "--epochs", "1", "--batch_size", "16", "--lr", "1e-3",
             "--max-train-examples", "32", "--max-dev-examples", "16", "--out", str(out), "--no-progress",
             "--log-every", "1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "mtbert.train", "--synthetic", *flags],
                         capture_output=True, text=True, env=environment, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| SST acc |") == 1  # rank 0 alone prints the table
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]  # written once, not once per rank
    assert [r["kind"] for r in records].count("final") == 1
    assert (out / "predictions" / "sts-test-output.csv").is_file()
    assert load_checkpoint(out / "last.pt")["global_step"] == 2


def test_cosent_split_over_micro_batches_warns(tiny_model_dir, toy_data, tmp_path):
    setup = {"data": str(toy_data), "model": str(tiny_model_dir)}
    with pytest.warns(UserWarning, match="cosent ranks the pairs within a batch"):
        Trainer(_config(setup, tmp_path, sts_loss="cosent", grad_accum=2))
