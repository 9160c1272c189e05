"""Process-group set-up for torchrun, the sampler that splits each global batch across ranks, and the
run-long stream of those batches that the trainer's one DataLoader reads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when the flag is set on any rank (used to stop together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """The random-augmentation seed of one sample in one epoch, the same on any number of ranks."""
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2**63 - 1)


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffles once per epoch from (seed, epoch) and cuts the order into global batches;
    rank r takes the r-th slice of each. One process sees the whole global batch, so
    N processes and one process train on exactly the same samples per iteration.
    Yields (index, augmentation seed) pairs; `start_batch` skips batches already done.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        *,
        info: DistInfo,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.n, self.global_batch, self.info = n, global_batch, info
        self.seed, self.epoch, self.start_batch, self.shuffle = seed, epoch, start_batch, shuffle
        self.per_rank = global_batch // info.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        lo = self.info.rank * self.per_rank
        for b in range(self.start_batch, self.batches_per_epoch):
            chunk = order[b * self.global_batch : (b + 1) * self.global_batch][lo : lo + self.per_rank]
            yield [(i, augment_seed(self.seed, self.epoch, i)) for i in chunk]


class BatchStream(Sampler[list[tuple[int, int]]]):
    """`GlobalBatchSampler`'s batches epoch after epoch, from (epoch, start_batch) on, without end.

    The trainer reads it through one DataLoader for the whole run, so loader workers start once, not
    once per epoch, and keep reading ahead across epoch boundaries. Every sample carries its own
    augmentation seed, so the batches do not depend on how many workers read them or how far ahead.
    A start_batch at or past the end of its epoch begins the next epoch (a checkpoint taken at an
    epoch's end records it so).
    """

    def __init__(self, n: int, global_batch: int, *, info: DistInfo, seed: int, epoch: int, start_batch: int = 0):
        self.n, self.global_batch, self.info = n, global_batch, info
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        if self.batches_per_epoch < 1:
            raise ValueError(f"{n} samples make no batch of {global_batch}")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.start_batch
        while True:
            sampler = GlobalBatchSampler(
                self.n, self.global_batch, info=self.info, seed=self.seed, epoch=epoch, start_batch=start
            )
            yield from sampler
            epoch, start = epoch + 1, 0


class SeededSamples(Dataset):
    """Runs a dataset's random transforms under a per-sample seed, leaving the global RNG untouched."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
