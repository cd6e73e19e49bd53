"""Data-parallel multitask steps under torch.distributed: mtbert's exact sharded design
(reduce-scatter of the [K, P] rows, all-reduce of the K x K Gram, sharded FusedAdamW, all-gather of
the parameters) against the plain one (all-reduce of the rows, every rank combines and updates
everything), on all-MiniLM-L6-v2 (``MTBERT_MINILM``, see conftest) with a batch of 16 per task (SST,
Quora, STS), gloo on the CPU; nccl on GPUs when there is one per process. With fewer than two GPUs
the processes run on the CPU (gloo): the traffic and memory goals do not depend on the device, and
a skip would leave them unchecked.

Per world size (1 and 2 processes): time per step and its split (forward + backward, waiting for
the slowest rank (a barrier, so that each collective's time is its own), reduce-scatter (the
all-reduce of the rows in the plain design), Gram + combine, Gram all-reduce, optimizer,
all-gather), the bytes of each collective's tensor, the ring-algorithm traffic per rank of both
designs (reduce-scatter and all-gather move (R-1)/R of their tensor, an all-reduce 2(R-1)/R), and
the optimizer state per rank. Gloo emulates reduce-scatter, so on the CPU the plain all-reduce can
be faster in wall time: the table says what was measured.

    python benchmarks/bench_distributed.py            # prints the table, writes results/distributed.md
    pytest benchmarks/bench_distributed.py -o python_files='bench_*.py'   # also checks the goals
"""
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DATA_DIR, MINILM

from mtbert import distributed
from mtbert.data import write_synthetic_data
from mtbert.optim import FusedAdamW
from mtbert.multitask.trainer import Trainer, TrainConfig

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.md"
WARMUP_STEPS, TIMED_STEPS = 1, 3
WORLD_SIZES = (1, 2)
# nccl wants a GPU per process.
USE_GPU = torch.cuda.device_count() >= max(WORLD_SIZES)
SPLIT = ("forward + backward", "waiting for the slowest rank", "reduce-scatter", "Gram + combine", "Gram all-reduce",
         "optimizer", "all-gather")


def _trainer(out):
    data = DATA_DIR if (DATA_DIR / "ids-sst-train.csv").is_file() else write_synthetic_data(Path(out) / "data")
    config = TrainConfig(model=MINILM, data=str(data), out=str(out), epochs=1, batch_size=16, max_train_examples=400,
                         max_dev_examples=2, lr=1e-4, grad_method="pcgrad", progress=False, save_every=0,
                         use_gpu=USE_GPU)
    return Trainer(config)


def _synchronize():
    if USE_GPU:
        torch.cuda.synchronize()


class _Clock:
    def __init__(self):
        self.seconds = dict.fromkeys(SPLIT, 0.0)

    def time(self, part, function, *args, **kwargs):
        _synchronize()
        started = time.perf_counter()
        result = function(*args, **kwargs)
        _synchronize()
        self.seconds[part] += time.perf_counter() - started
        return result


def _pass(trainer):
    trainer.gradients.zero_grad()
    tasks = list(trainer.config.tasks)
    slots = [(task, batch) for task, batch in zip(tasks, (trainer._next_batch(t)[0] for t in tasks))
             if batch["inputs"] is not None]
    trainer._packed_pass(*zip(*slots))


def _sharded_step(trainer, clock):
    path = trainer.gradients
    clock.time("forward + backward", _pass, trainer)
    clock.time("waiting for the slowest rank", dist.barrier)  # so that the collectives' times are theirs alone
    clock.time("reduce-scatter", path.sharded.reduce_scatter)
    reduce_gram = path.sharded.all_reduce_gram
    path.sharded.all_reduce_gram = lambda gram: clock.time("Gram all-reduce", reduce_gram, gram)
    combine_started = clock.seconds["Gram all-reduce"]
    clock.time("Gram + combine", path.sharded.combine, path.weighting)
    clock.seconds["Gram + combine"] -= clock.seconds["Gram all-reduce"] - combine_started
    path.sharded.all_reduce_gram = reduce_gram
    clock.time("optimizer", path.optimizer.step)
    clock.time("all-gather", path.sharded.all_gather_parameters)


def _plain_step(trainer, optimizer, clock):
    """The plain design: all-reduce of the whole [K, P] rows (timed as its reduce-scatter part),
    every rank combines and updates the whole buffer."""
    path = trainer.gradients
    clock.time("forward + backward", _pass, trainer)
    if distributed.is_distributed():
        clock.time("waiting for the slowest rank", dist.barrier)
        clock.time("reduce-scatter", dist.all_reduce, path.flat.grads)
    clock.time("Gram + combine", path.flat.combine, path.weighting)
    clock.time("optimizer", optimizer.step)


def _measure(step, *args):
    for _ in range(WARMUP_STEPS):
        step(*args, _Clock())
    clock = _Clock()
    for _ in range(TIMED_STEPS):
        step(*args, clock)
    return {part: seconds / TIMED_STEPS for part, seconds in clock.seconds.items()}


def _worker(rank, world, port, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    device = torch.device("cuda" if USE_GPU else "cpu")
    if world > 1:
        distributed.init_process_group(device, timeout_s=300)
    trainer = _trainer(Path(out) / f"run{world}")
    flat = trainer.gradients.flat
    K, P = flat.num_tasks, flat.numel
    row = {"world": world, "K": K, "P": P, "optimizer_state_bytes": 2 * 4 * trainer.optimizer.exp_avg.numel()}
    if world > 1:
        row["sharded"] = _measure(_sharded_step, trainer)
        sharded_bytes = dict(trainer.gradients.sharded.collective_bytes)
        row["sharded_bytes"] = {name: n / (WARMUP_STEPS + TIMED_STEPS) for name, n in sharded_bytes.items()}
        plain_optimizer = FusedAdamW(trainer.optimizer.param_groups[0]["params"], lr=1e-4)
        row["plain"] = _measure(_plain_step, trainer, plain_optimizer)
        row["plain_bytes"] = {"all_reduce": flat.grads.numel() * flat.grads.element_size()}
        row["plain_optimizer_state_bytes"] = 2 * 4 * P
    else:
        row["plain"] = _measure(_plain_step, trainer, trainer.optimizer)
    if rank == 0:
        torch.save(row, Path(results) / f"world{world}.pt")
    if world > 1:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ring_traffic(collective_bytes, world):
    """Bytes each rank sends in ring algorithms: (R-1)/R of a reduce-scatter's or an all-gather's
    tensor, 2(R-1)/R of an all-reduce's."""
    share = (world - 1) / world
    return share * (collective_bytes.get("reduce_scatter", 0) + collective_bytes.get("all_gather", 0)
                    + 2 * collective_bytes.get("all_reduce", 0))


def run(worlds=WORLD_SIZES):
    rows = {"load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as out:
        for world in worlds:
            mp.spawn(_worker, args=(world, _free_port(), out, out), nprocs=world)
            rows[world] = torch.load(Path(out) / f"world{world}.pt", weights_only=False)
    return rows


def render(rows):
    backend = "nccl" if USE_GPU else "gloo"
    lines = [f"# Distributed step ({backend}, {MINILM}, 16 examples per task, K = 3, one thread per rank)", "",
             "| processes | design | step ms | " + " | ".join(f"{part} ms" for part in SPLIT)
             + " | traffic per rank MB | optimizer state per rank MB |",
             "|---|---|---|" + "---|" * len(SPLIT) + "---|---|"]
    lines.insert(1, f"\nLoad average when it started: {rows['load']:.1f} on {os.cpu_count()} cores "
                    "(other jobs share this machine: the times are rough).")
    for world, row in rows.items():
        if world == "load":
            continue
        designs = [("plain" if world == 1 else "plain (all-reduce of the rows)", row["plain"],
                    ring_traffic(row.get("plain_bytes", {}), world),
                    row.get("plain_optimizer_state_bytes", row["optimizer_state_bytes"]))]
        if "sharded" in row:
            designs.append(("mtbert (reduce-scatter, Gram all-reduce, sharded AdamW, all-gather)", row["sharded"],
                            ring_traffic(row["sharded_bytes"], world), row["optimizer_state_bytes"]))
        for name, seconds, traffic, state in designs:
            lines.append(f"| {world} | {name} | {1e3 * sum(seconds.values()):.0f} | "
                         + " | ".join(f"{1e3 * seconds[part]:.1f}" for part in SPLIT)
                         + f" | {traffic / 1e6:.1f} | {state / 1e6:.1f} |")
        if "sharded" in row:
            K = row["K"]
            ratio = ring_traffic(row["sharded_bytes"], world) / ring_traffic(row["plain_bytes"], world)
            lines += ["", f"{world} processes: traffic ratio mtbert / plain = {ratio:.3f} "
                          f"(goal (K+1)/(2K) = {(K + 1) / (2 * K):.3f} + 5%); optimizer state per rank "
                          f"{row['optimizer_state_bytes'] / row['plain_optimizer_state_bytes']:.3f} of one process's."]
    return "\n".join(lines) + "\n"


def test_distributed_traffic_and_optimizer_memory():
    rows = run()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(render(rows), encoding="utf-8")
    row = rows[2]
    K = row["K"]
    assert ring_traffic(row["sharded_bytes"], 2) <= ((K + 1) / (2 * K) + 0.05) * ring_traffic(row["plain_bytes"], 2)
    assert abs(row["optimizer_state_bytes"] / rows[1]["optimizer_state_bytes"] - 1 / 2) < 0.01


if __name__ == "__main__":
    table = render(run())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table, encoding="utf-8")
    print(table)
    sys.exit(0)
