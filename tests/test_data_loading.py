"""The trainer's data loading: one run-long batch stream, the loader-worker count, the CPUs a process may use."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from spade import devices
from spade.config import DataConfig
from spade.errors import SpadeError
from spade.train.distributed import BatchStream, DistInfo, GlobalBatchSampler
from spade.train.loop import MAX_AUTO_WORKERS, loader_workers


def epoch_batches(n: int, batch: int, epoch: int, start: int = 0) -> list:
    return list(GlobalBatchSampler(n, batch, info=DistInfo(), seed=3, epoch=epoch, start_batch=start))


def test_the_stream_runs_on_through_epochs_with_each_epochs_own_order():
    stream = BatchStream(10, 3, info=DistInfo(), seed=3, epoch=2, start_batch=1)
    got = list(itertools.islice(stream, 8))
    # 10 samples in batches of 3: 3 batches an epoch, the last sample of each epoch's order left out
    want = epoch_batches(10, 3, 2, 1) + epoch_batches(10, 3, 3) + epoch_batches(10, 3, 4)
    assert len(want) == 8 and got == want
    assert got[2] != got[5]  # each epoch its own shuffle and augmentation seeds


def test_a_start_at_the_end_of_an_epoch_begins_the_next():
    stream = BatchStream(12, 4, info=DistInfo(), seed=3, epoch=0, start_batch=3)
    assert list(itertools.islice(stream, 3)) == epoch_batches(12, 4, 1)


def test_each_rank_streams_its_slice_of_the_same_global_batches():
    ranks = [BatchStream(16, 4, info=DistInfo(rank=r, world_size=2), seed=3, epoch=0) for r in range(2)]
    whole = list(itertools.islice(BatchStream(16, 4, info=DistInfo(), seed=3, epoch=0), 6))
    halves = [list(itertools.islice(r, 6)) for r in ranks]
    assert [a + b for a, b in zip(*halves, strict=True)] == whole


def test_a_stream_without_a_whole_batch_is_refused():
    with pytest.raises(ValueError, match="3 samples make no batch of 4"):
        BatchStream(3, 4, info=DistInfo(), seed=0, epoch=0)


def test_a_loader_with_workers_reads_the_same_batches_as_the_training_process():
    class Echo(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 7

        def __getitem__(self, item: tuple[int, int]) -> tuple[int, int]:
            return item  # (index, augmentation seed)

    def first(workers: int) -> list:
        stream = BatchStream(7, 2, info=DistInfo(), seed=1, epoch=0)
        loader = torch.utils.data.DataLoader(Echo(), batch_sampler=stream, num_workers=workers)
        return [(b[0].tolist(), b[1].tolist()) for b in itertools.islice(loader, 10)]  # 3 an epoch: 3 ends

    assert first(2) == first(0)


@pytest.mark.parametrize(
    ("cpus", "local", "want"),
    [(64, 8, MAX_AUTO_WORKERS), (16, 8, 1), (8, 1, MAX_AUTO_WORKERS), (4, 1, 3), (2, 1, 1), (1, 1, 1), (8, 16, 1)],
)
def test_auto_workers_share_the_cpus_among_the_gpu_processes(monkeypatch, cpus, local, want):
    monkeypatch.setattr("spade.train.loop.usable_cpus", lambda: cpus)
    assert loader_workers("auto", torch.device("cuda", 0), local) == want


def test_auto_workers_read_the_local_process_count_torchrun_sets(monkeypatch):
    monkeypatch.setattr("spade.train.loop.usable_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers("auto", torch.device("cuda", 0)) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_workers("auto", torch.device("cuda", 0)) == MAX_AUTO_WORKERS


def test_auto_is_no_workers_on_cpu_and_a_number_is_kept(monkeypatch):
    monkeypatch.setattr("spade.train.loop.usable_cpus", lambda: 64)
    assert loader_workers("auto", torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    assert loader_workers(0, torch.device("cuda", 0)) == 0


@pytest.mark.parametrize("value", ["auto", 0, 5])
def test_num_workers_takes_auto_or_a_count(value):
    assert DataConfig(num_workers=value).num_workers == value


@pytest.mark.parametrize("value", [-1, "many", "2", True, 2.5, None])
def test_num_workers_refuses_anything_else(value):
    with pytest.raises(SpadeError, match=r"data.num_workers must be auto or a whole number >= 0, got"):
        DataConfig(num_workers=value)


def test_usable_cpus_follow_the_cgroup_quota(monkeypatch, tmp_path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(devices, "CGROUP_CPU_MAX", cpu_max)
    assert devices.usable_cpus() == affinity  # no cgroup file: the affinity set
    cpu_max.write_text("max 100000\n")
    assert devices.usable_cpus() == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU still gets one
    assert devices.usable_cpus() == 1
    cpu_max.write_text(f"{affinity * 100000 + 1} 100000\n")  # a quota above the affinity set does not add CPUs
    assert devices.usable_cpus() == affinity
    cpu_max.write_text("garbage\n")
    assert devices.usable_cpus() == affinity
