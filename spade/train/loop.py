"""`spade train`: the training loop.

One iteration is a discriminator step, preceded by a generator step every
`d_steps_per_g` iterations (the authors' release does the same). Run it in one
process, or under torchrun for distributed data parallel training.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler

from spade.checkpoints import Checkpoint
from spade.config import Settings
from spade.devices import resolve_device, usable_cpus
from spade.errors import SpadeError
from spade.losses import VGGLoss
from spade.nn.vgg import VGG19Features
from spade.progress import progress_bar
from spade.train import checkpointing as ckpts
from spade.train.distributed import (
    BatchStream,
    DistInfo,
    SeededSamples,
    any_rank,
    init_distributed,
    shutdown_distributed,
)
from spade.train.objective import (
    Objective,
    TrainStep,
    build_networks,
    build_optimizers,
    place,
    training_numerics,
)
from spade.train.sync_batchnorm import convert_sync_batchnorm
from spade.train.tracking import MLflowTracker, Tracker, git_commit
from spade.visualize import dataset_colours, sample_grid

SIGTERM_EXIT = 143
# data.num_workers=auto on a GPU: reading and augmenting one coco sample at 256x256 takes about 7-10 ms of one
# core (benchmarks/data_loading.py), so 4 workers supply some 400-500 samples/s to each GPU
MAX_AUTO_WORKERS = 4


@dataclass
class TrainResult:
    iteration: int
    stopped_by_signal: bool
    checkpoint: str | None
    final_model: Path | None
    run_id: str | None
    history: list[dict] = field(default_factory=list)


class _StopFlag:
    """Set by SIGTERM (pod eviction) or SIGINT; the loop finishes its iteration, saves and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pick_device(name: str, info: DistInfo) -> torch.device:
    """train.device resolved; under torchrun each process takes the GPU of its local rank."""
    dev = resolve_device(name)
    if dev.type == "cuda":
        return torch.device("cuda", info.local_rank if info.enabled else dev.index or 0)
    return dev


def loader_workers(setting: int | str, device: torch.device, local_processes: int | None = None) -> int:
    """data.num_workers resolved. auto: none on CPU, where workers would take cores from the model's own
    threads for what is a fraction of a percent of an iteration; on a GPU, a share of this machine's
    CPUs per training process on it (one kept for the process itself), at most MAX_AUTO_WORKERS."""
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, usable_cpus() // max(1, local_processes) - 1))


def training_loader(dataset: Dataset, sampler: Sampler, workers: int, device: torch.device) -> DataLoader:
    """The DataLoader training reads: each sample under its own augmentation seed (`SeededSamples`, the
    sampler yields (index, seed) batches), pinned memory for a GPU, workers that leave stop signals alone.

    The loader draws its workers' base seed from a generator of its own, not from torch's global one:
    starting an iterator would otherwise take one number from the global stream, which a resumed run
    does at another point than an uninterrupted one, and the image encoder's sampling noise (drawn from
    that stream) would differ after a resume.
    """
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_stop_signals if workers else None,
        generator=torch.Generator().manual_seed(0),
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT / SIGTERM to the trainer, which saves, then shuts them down: a Ctrl-C
    reaches the whole process group, and a worker it killed would fail the fetch before the save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, DDP) else m


def train(
    settings: Settings,
    *,
    resume: str | None = None,
    progress: bool = True,
    dataset_fingerprint: str | None = None,
) -> TrainResult:
    """Train a SPADE model as `settings` say; resume from `resume` (folder, s3 prefix or file) if given."""
    from spade.data.dataset import build_dataset  # deferred: data readers are heavy to import

    mc, dc, tc = settings.model, settings.data, settings.train
    probe_device = pick_device(tc.device, DistInfo())
    info = init_distributed(probe_device.type)
    try:
        device = pick_device(tc.device, info)
        if tc.batch_size % info.world_size:
            raise SpadeError(f"train.batch_size {tc.batch_size} must be divisible by the {info.world_size} processes")
        precision, channels_last = training_numerics(tc, device)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(tc.seed + info.rank)

        dataset = build_dataset(dc, mc, train=True, progress=progress and info.is_main)
        if len(dataset) < tc.batch_size:
            raise SpadeError(f"the dataset has {len(dataset)} samples, fewer than one batch of {tc.batch_size}")
        preview = _preview_batch(settings, progress=False) if info.is_main and tc.sample_every else None

        gside, disc = build_networks(mc, tc)
        if info.enabled and mc.spade_norm == "syncbatch":
            gside = convert_sync_batchnorm(gside, device.type)
        place(device, channels_last, gside, disc)
        vgg = VGGLoss(VGG19Features(tc.vgg_weights or None).to(device), tc.lambda_vgg) if tc.vgg_loss else None
        opt_g, opt_d = build_optimizers(gside, disc, tc)
        start_iter, epoch, batch_in_epoch, run_id = 0, 0, 0, None
        scaler_state = None
        location = tc.checkpoint_location
        if info.is_main:
            stale = ckpts.remove_stale_temporaries(location)
            if stale:
                print(
                    f"removed {len(stale)} temporary file(s) of interrupted checkpoint writes from {location}",
                    file=sys.stderr,
                )
        if resume is not None:
            found = _resume_point(resume or location, info)
            if found is None:
                if info.is_main:
                    print(f"no checkpoint in {resume or location}; starting from scratch", file=sys.stderr)
            else:
                ckpt, source = found
                ckpts.check_compatible(ckpt, mc.to_dict(), source)
                _load_nets(ckpt, gside, disc)
                t = ckpt.training
                opt_g.load_state_dict(t["optimizer_G"])
                opt_d.load_state_dict(t["optimizer_D"])
                scaler_state = (t["scaler_G"], t["scaler_D"])
                start_iter, epoch, batch_in_epoch = t["iteration"], t["epoch"], t["batch_in_epoch"]
                run_id = t.get("mlflow_run_id")
                rng = t["rng"]
                if len(rng) == info.world_size:
                    ckpts.restore_rng(rng[info.rank])
                else:  # a different number of processes: fresh per-rank seeds, derived from the iteration
                    seed_everything(tc.seed + info.rank + 7919 * start_iter)
                if info.is_main:
                    print(f"resuming from {source} at iteration {start_iter}", file=sys.stderr)

        g_model: nn.Module = gside
        d_model: nn.Module = disc
        if info.enabled:
            ids = [device.index] if device.type == "cuda" else None
            g_model = DDP(gside, device_ids=ids)
            d_model = DDP(disc, device_ids=ids)

        objective = Objective(mc, tc, vgg, world_size=info.world_size)
        step = TrainStep(objective, g_model, d_model, opt_g, opt_d, precision=precision, device=device)
        if scaler_state is not None:
            step.scaler_g.load_state_dict(scaler_state[0])
            step.scaler_d.load_state_dict(scaler_state[1])
        tracker = _make_tracker(settings, run_id, info)
        fingerprint = (dataset_fingerprint or _fingerprint(dataset)) if info.is_main else ""
        classes = _class_info(settings)
        workers = loader_workers(dc.num_workers, device)
        if info.is_main:
            params = flatten(settings.to_dict())
            params.update(
                {
                    "world_size": info.world_size,
                    "device": device.type,
                    "dataset_size": len(dataset),
                    "precision_used": precision,
                    "num_workers_used": workers,
                }
            )
            if start_iter == 0:
                tracker.log_params(params)
            tracker.set_tags(
                {
                    "git_commit": git_commit(),
                    "dataset_fingerprint": fingerprint,
                    "preset": mc.preset,
                }
            )

        stream = BatchStream(
            len(dataset), tc.batch_size, info=info, seed=tc.seed, epoch=epoch, start_batch=batch_in_epoch
        )
        if batch_in_epoch >= stream.batches_per_epoch:  # a checkpoint from the end of an epoch
            epoch, batch_in_epoch = epoch + 1, 0
        loader = training_loader(dataset, stream, workers, device)
        history: list[dict] = []
        it = start_iter
        last_ckpt: str | None = None
        window: dict[str, float] = {}
        window_n, window_t0 = 0, time.perf_counter()
        curves = LossCurves(Path(tc.out_dir) / "loss_curves.csv", start_iter)
        bar = progress_bar(
            total=tc.iterations, initial=start_iter, desc="train", unit="it", disable=not (progress and info.is_main)
        )
        stopped = False

        def lineage(iteration: int) -> dict:
            return {
                "source": "training",
                "iteration": iteration,
                "git_commit": git_commit(),
                "dataset_fingerprint": fingerprint,
                "mlflow_run_id": tracker.run_id,
                "mlflow_tracking_uri": getattr(tracker, "uri", None),
                **classes,
            }

        def save(iteration: int) -> str | None:
            rng = _gather(ckpts.capture_rng(), info)
            checksums = _gather(_checksums(gside, disc), info)
            if info.is_main and any(c != checksums[0] for c in checksums):
                raise SpadeError(f"replicas diverged by iteration {iteration}: ranks hold different weights")
            if not info.is_main:
                return None
            ckpt = _make_checkpoint(settings, gside, disc, lineage(iteration))
            ckpt.training = {
                "iteration": iteration,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "optimizer_G": opt_g.state_dict(),
                "optimizer_D": opt_d.state_dict(),
                "scaler_G": step.scaler_g.state_dict(),
                "scaler_D": step.scaler_d.state_dict(),
                "rng": rng,
                "world_size": info.world_size,
                "settings": settings.to_dict(),
                "mlflow_run_id": tracker.run_id,
                "replica_checksums": checksums,
            }
            return ckpts.save_checkpoint(ckpt, location, iteration, tc.keep_checkpoints)

        with _StopFlag() as stop:
            batches = iter(loader) if it < tc.iterations else iter(())  # workers start here, once per run
            try:
                for batch in batches:
                    factor = tc.lr_factor(it)
                    for group in opt_g.param_groups:
                        group["lr"] = tc.lr_G * factor
                    for group in opt_d.param_groups:
                        group["lr"] = tc.lr_D * factor
                    seg, real = objective.inputs(batch, device, channels_last)
                    logged = step(seg, real, it)

                    it += 1
                    batch_in_epoch += 1
                    if batch_in_epoch == stream.batches_per_epoch:
                        epoch, batch_in_epoch = epoch + 1, 0
                    for k, v in logged.items():
                        window[k] = window.get(k, 0.0) + float(v.detach())
                    window_n += 1
                    bar.update(1)
                    if it % tc.log_every == 0 or it == tc.iterations:
                        elapsed = time.perf_counter() - window_t0
                        metrics = _mean_over_ranks({k: v / window_n for k, v in window.items()}, info, device)
                        metrics["images_per_sec"] = window_n * tc.batch_size / max(elapsed, 1e-9)
                        metrics["lr_G"] = opt_g.param_groups[0]["lr"]
                        metrics["lr_D"] = opt_d.param_groups[0]["lr"]
                        if not all(math.isfinite(v) for v in metrics.values()):
                            raise SpadeError(f"training diverged at iteration {it}: {metrics}")
                        history.append({"iteration": it, **metrics})
                        if info.is_main:
                            curves.append(it, metrics)
                        tracker.log_metrics(metrics, step=it)
                        bar.set_postfix(
                            {k: f"{metrics[k]:.3f}" for k in ("G_GAN", "G_VGG", "D_real", "D_fake") if k in metrics}
                            | {"img/s": f"{metrics['images_per_sec']:.1f}"},
                            refresh=False,
                        )
                        window, window_n, window_t0 = {}, 0, time.perf_counter()
                    if preview is not None and tc.sample_every and (it % tc.sample_every == 0 or it == tc.iterations):
                        _log_samples(gside, preview, mc, tracker, Path(tc.out_dir), it, device)
                    if any_rank(stop.signal is not None, info, device):
                        last_ckpt = save(it)
                        stopped = True
                        break
                    if it % tc.checkpoint_every == 0 and it < tc.iterations:
                        last_ckpt = save(it)
                    if it >= tc.iterations:
                        break
            finally:
                del batches  # stops the workers now, not when the iterator happens to be collected
        bar.close()

        final_model = None
        if not stopped:
            last_ckpt = save(it)
            if info.is_main:
                final_model = _make_checkpoint(settings, gside, disc, lineage(it)).save(Path(tc.out_dir) / "final.pt")
                tracker.log_artifact(final_model, "model")
        if info.is_main:
            # on SIGTERM the pod has a short grace period: do not wait long for an absent server
            if stopped:
                tracker.close("KILLED", timeout=10.0)
            else:
                tracker.close("FINISHED")
        return TrainResult(it, stopped, last_ckpt, final_model, tracker.run_id, history)
    finally:
        shutdown_distributed()


class LossCurves:
    """`loss_curves.csv` in the output folder: one row per logged step, kept across resumes (for DVC plots)."""

    def __init__(self, path: Path, start_iter: int) -> None:
        self.path = path
        self.columns: list[str] | None = None
        if path.is_file():
            lines = path.read_text().splitlines()
            if lines:
                self.columns = lines[0].split(",")
                # drop rows a killed run logged after its last checkpoint: they will be logged again
                kept = [lines[0]] + [ln for ln in lines[1:] if ln and int(ln.split(",")[0]) <= start_iter]
                path.write_text("\n".join(kept) + "\n")
        elif start_iter == 0:
            path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, iteration: int, metrics: dict[str, float]) -> None:
        if self.columns is None:
            self.columns = ["iteration", *sorted(metrics)]
            self.path.write_text(",".join(self.columns) + "\n")
        row = [str(iteration)] + [f"{metrics.get(c, float('nan')):.6g}" for c in self.columns[1:]]
        with self.path.open("a") as fh:
            fh.write(",".join(row) + "\n")


def _mean_over_ranks(metrics: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Each rank's loss is a mean over its slice of the global batch: average them into the global mean."""
    if not info.enabled:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def _resume_point(location: str, info: DistInfo) -> tuple[Checkpoint, str] | None:
    """The checkpoint to resume from: chosen by rank 0 (passing over unreadable ones) and loaded by name by
    every other process, so that all start from the same one."""
    if not info.enabled:
        return ckpts.load_latest(location)
    import torch.distributed as dist

    chosen: list = [None]
    found, failure = None, None
    if info.is_main:
        try:
            found = ckpts.load_latest(location)
            chosen = [("found", found[1]) if found is not None else ("none", "")]
        except SpadeError as exc:
            failure = exc
            chosen = [("error", str(exc))]
    dist.broadcast_object_list(chosen, src=0)  # the others wait for rank 0's choice, or its failure
    kind, value = chosen[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise SpadeError(f"rank 0 could not choose a checkpoint to resume from: {value}")
    if info.is_main:
        return found
    return None if kind == "none" else (ckpts.load_checkpoint(value), value)


def _gather(obj: dict, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _checksums(*modules: nn.Module) -> list[float]:
    """One float64 sum per parameter and buffer: equal lists mean equal replicas (in practice)."""
    return [float(t.detach().double().sum()) for m in modules for t in _unwrap(m).state_dict().values()]


def _class_info(settings: Settings) -> dict:
    """Class names (and the built-in data set's colours) for the checkpoint, so serving can show them."""
    from spade.data.synthetic import read_class_names
    from spade.visualize import dataset_colours

    root = settings.data.root
    try:
        names = read_class_names(root)
    except SpadeError:
        return {}
    if len(names) != settings.model.label_nc:
        return {}
    info: dict = {"class_names": names}
    colours = dataset_colours(root, settings.model.label_nc)
    if colours is not None:
        info["class_colours"] = colours.tolist()
    return info


def _make_checkpoint(settings: Settings, gside: nn.Module, disc: nn.Module, meta: dict) -> Checkpoint:
    g = _unwrap(gside)

    def cpu_state(m: nn.Module) -> dict:
        return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}

    return Checkpoint(
        config=settings.model,
        generator=cpu_state(g.generator),
        encoder=cpu_state(g.encoder) if g.encoder is not None else None,
        discriminator=cpu_state(_unwrap(disc)),
        meta=meta,
    )


def _load_nets(ckpt: Checkpoint, gside: nn.Module, disc: nn.Module) -> None:
    g = _unwrap(gside)
    g.generator.load_state_dict(ckpt.generator)
    if g.encoder is not None:
        g.encoder.load_state_dict(ckpt.encoder)
    if ckpt.discriminator is None:
        raise SpadeError("cannot resume: the checkpoint has no discriminator")
    _unwrap(disc).load_state_dict(ckpt.discriminator)


def _make_tracker(settings: Settings, run_id: str | None, info: DistInfo) -> Tracker:
    if not info.is_main or not settings.tracking.enabled:
        return Tracker()
    try:
        return MLflowTracker(settings.tracking, out_dir=Path(settings.train.out_dir), run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        print(
            f"warning: MLflow tracking unavailable ({type(exc).__name__}: {exc}); training without it", file=sys.stderr
        )
        return Tracker()


def _fingerprint(dataset: object) -> str:
    from spade.data.fingerprint import samples_fingerprint

    return samples_fingerprint(dataset.samples)  # type: ignore[attr-defined]


def _preview_batch(settings: Settings, *, progress: bool) -> dict | None:
    """A fixed batch for sample grids: the first validation samples (training ones if there is no val split)."""
    from dataclasses import replace

    from spade.data.dataset import build_dataset

    n = settings.train.num_samples
    for split in ("val", "train"):
        try:
            ds = build_dataset(
                replace(settings.data, split=split, max_samples=n), settings.model, train=False, progress=progress
            )
        except SpadeError:
            continue
        items = [ds[i] for i in range(min(n, len(ds)))]
        batch = {k: torch.stack([x[k] for x in items]) for k in ("label", "instance", "image")}
        return batch | {"colours": dataset_colours(settings.data.root, settings.model.label_nc)}
    return None


@torch.no_grad()
def _log_samples(gside, preview, mc, tracker, out_dir, it, device) -> None:  # noqa: ANN001
    from spade.labels import semantic_input
    from spade.synthesize import save_png

    g = _unwrap(gside)
    was_training = g.training
    g.eval()
    try:
        label = preview["label"].to(device)
        instance = preview["instance"].to(device) if mc.use_instance else None
        seg = semantic_input(label, mc, instance)
        z = None
        if g.encoder is not None:
            z = torch.randn(label.shape[0], mc.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
        fake = g.generator(seg, z)
    finally:
        g.train(was_training)
    grid = sample_grid(preview["label"], preview["image"], fake.cpu(), mc.label_nc, colours=preview.get("colours"))
    path = save_png(grid, out_dir / "samples" / f"iter_{it:08d}.png")
    tracker.log_image(grid, f"samples/{path.name}")
