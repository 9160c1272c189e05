"""The trainer: exact resume, SIGTERM, atomic checkpoints, distributed data parallel, learning."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from spade.checkpoints import Checkpoint
from spade.config import Settings, load_settings
from spade.data.synthetic import generate_builtin_dataset
from spade.errors import SpadeError
from spade.train.checkpointing import list_checkpoints
from train_helpers import SPADE, child_env, free_port, tiny_params, wait_for, write_params


@pytest.fixture(scope="session")
def builtin_32(tmp_path_factory) -> Path:
    return generate_builtin_dataset(
        tmp_path_factory.mktemp("builtin") / "data", count=24, val_count=8, size=32, progress=False
    )


def run_train(params_file: Path, *args: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SPADE, "train", "--params", str(params_file), *args], capture_output=True, text=True,
                          env=child_env(), timeout=300, **popen)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"spade train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_params_yaml_and_overrides(tmp_path, builtin_32):
    path = write_params(tmp_path / "params.yaml", tiny_params(builtin_32, tmp_path / "out"))
    s = load_settings(path, ["train.iterations=42", "model.ngf=4", "data.no_flip=true"])
    assert s.train.iterations == 42 and s.model.ngf == 4 and s.data.no_flip and s.model.label_nc == 8
    assert s.train.lr_G == pytest.approx(0.0001) and s.train.lr_D == pytest.approx(0.0004)
    assert s.train.betas == (0.0, 0.9)
    assert Settings.from_dict({"train": {"ttur": False}}).train.betas == (0.5, 0.999)
    with pytest.raises(SpadeError, match="unknown train settings: iterationz"):
        load_settings(path, ["train.iterationz=3"])
    with pytest.raises(SpadeError, match="must look like section.key=value"):
        load_settings(path, ["iterations=3"])


def test_linear_lr_decay():
    tc = Settings.from_dict({"train": {"iterations": 100, "lr_decay_start": 0.5}}).train
    assert [tc.lr_factor(i) for i in (0, 49, 50, 75, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0]


def test_exact_resume_after_sigterm(tmp_path, builtin_32):
    """2N iterations straight == N, SIGTERM, resume to 2N: bit-identical weights and optimiser state.

    The straight run reads its data in the training process; the interrupted one with two loader workers,
    and the signal goes to its whole process group (as Ctrl-C or a container stop does), workers included.
    24 samples in batches of 4 over 12 iterations: two epochs, so the workers read across an epoch's end.
    """
    total = 12
    straight = write_params(
        tmp_path / "a.yaml",
        tiny_params(builtin_32, tmp_path / "a", train={"iterations": total}, data={"num_workers": 0}),
    )
    run_train(straight)
    interrupted = write_params(
        tmp_path / "b.yaml",
        tiny_params(builtin_32, tmp_path / "b", train={"iterations": total}, data={"num_workers": 2}),
    )
    proc = subprocess.Popen([*SPADE, "train", "--params", str(interrupted)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), start_new_session=True)  # fmt: skip
    ckpt_dir = tmp_path / "b" / "checkpoints"
    wait_for(lambda: (ckpt_dir / "iter_00000002.pt").exists() or proc.poll() is not None, 120, "first checkpoint")
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "continue with --resume" in out
    stopped_at = list_checkpoints(str(ckpt_dir))[-1][0]
    assert 2 <= stopped_at < total, f"the run was not interrupted mid-way (stopped at {stopped_at})"
    assert not (tmp_path / "b" / "final.pt").exists()

    resumed = run_train(interrupted, "--resume")
    assert f"resuming from {ckpt_dir / f'iter_{stopped_at:08d}.pt'} at iteration {stopped_at}" in resumed.stderr
    a = Checkpoint.load(tmp_path / "a" / "checkpoints" / f"iter_{total:08d}.pt")
    b = Checkpoint.load(ckpt_dir / f"iter_{total:08d}.pt")
    assert states_equal(a.generator, b.generator)
    assert states_equal(a.discriminator, b.discriminator)
    assert a.training["optimizer_G"]["state"].keys() == b.training["optimizer_G"]["state"].keys()
    for key, state in a.training["optimizer_G"]["state"].items():
        assert torch.equal(state["exp_avg"], b.training["optimizer_G"]["state"][key]["exp_avg"])
    # and training did change the weights (the comparison is not between two untouched models)
    first = Checkpoint.load(tmp_path / "a" / "checkpoints" / "iter_00000002.pt")
    assert not states_equal(first.generator, a.generator)


def test_resume_refuses_a_different_model(tmp_path, builtin_32):
    params = tiny_params(builtin_32, tmp_path / "r", train={"iterations": 2})
    run_train(write_params(tmp_path / "p.yaml", params))
    params["model"]["ngf"] = 16
    proc = run_train(write_params(tmp_path / "q.yaml", params), "--resume", check=False)
    assert proc.returncode == 1
    assert "cannot resume from" in proc.stderr and "ngf: checkpoint 8 vs now 16" in proc.stderr


def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """SIGKILL a process that keeps saving big checkpoints: every visible checkpoint still loads."""
    script = textwrap.dedent(
        """
        import sys, torch
        from spade.checkpoints import Checkpoint
        from spade.config import ModelConfig
        from spade.train.checkpointing import save_checkpoint
        cfg = ModelConfig.from_preset("custom", ngf=4, crop_size=32)
        big = {"w": torch.randn(20_000_000)}
        for i in range(1, 10_000):
            big["w"][0] = i
            save_checkpoint(Checkpoint(config=cfg, generator=big, training={"iteration": i}), sys.argv[1], i, keep=2)
            print(i, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=child_env())  # fmt: skip
    assert proc.stdout.readline().strip() == "1"
    time.sleep(0.7)  # somewhere inside a later save
    proc.kill()
    proc.wait()
    found = list_checkpoints(str(tmp_path))
    assert found, "no checkpoint survived"
    for iteration, name in found:
        ckpt = Checkpoint.load(tmp_path / name)
        assert ckpt.training["iteration"] == iteration and ckpt.generator["w"][0] == iteration
    # pruning follows the atomic write, so a kill between the two leaves one more than `keep` (seen: 3 on
    # a loaded machine); any more would mean old checkpoints are not pruned
    assert len(found) <= 2 + 1


def read_curves(out_dir: Path) -> list[dict]:
    lines = (out_dir / "loss_curves.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, map(float, line.split(",")), strict=True)) for line in lines[1:]]


def test_two_process_ddp_matches_one_process(tmp_path, builtin_32):
    """torchrun with 2 CPU processes (gloo, synchronized batch norm) == 1 process on the same global batch."""
    base = tiny_params(builtin_32, tmp_path / "single", train={"iterations": 2, "checkpoint_every": 1})
    run_train(write_params(tmp_path / "single.yaml", base))
    base["train"]["out_dir"] = str(tmp_path / "ddp")
    ddp = write_params(tmp_path / "ddp.yaml", base)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "spade", "train"]
    proc = subprocess.run([*cmd, "--params", str(ddp)], capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished 2 iterations") == 1  # rank 0 alone reports

    # the first iteration's losses (global means over both ranks' halves) equal the single process's
    single_curve, ddp_curve = read_curves(tmp_path / "single"), read_curves(tmp_path / "ddp")
    for key in ("G_GAN", "G_feat", "D_real", "D_fake"):
        assert ddp_curve[0][key] == pytest.approx(single_curve[0][key], rel=1e-4, abs=1e-6), key

    for it in (1, 2):
        name = f"iter_{it:08d}.pt"
        one = Checkpoint.load(tmp_path / "single" / "checkpoints" / name)
        two = Checkpoint.load(tmp_path / "ddp" / "checkpoints" / name)
        assert two.training["world_size"] == 2
        sums = two.training["replica_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], "the two ranks hold different weights"
    # the batch-norm statistics were synchronized: running means match the single process
    key = "head_0.norm_0.param_free_norm.running_mean"
    one = Checkpoint.load(tmp_path / "single" / "checkpoints" / "iter_00000001.pt")
    two = Checkpoint.load(tmp_path / "ddp" / "checkpoints" / "iter_00000001.pt")
    assert one.generator[key].abs().sum() > 0
    assert torch.allclose(one.generator[key], two.generator[key], atol=5e-4)


def test_ddp_gradients_equal_single_process_gradients(tmp_path):
    """The data-parallel step computes the gradient of the global batch: every parameter's gradient on
    2 processes (DDP-averaged, batch norm synchronized) equals the 1-process gradient, within float tolerance.
    (Weights after an Adam step are not compared elementwise: Adam's first step is lr * sign(gradient), so
    float noise in gradients that are zero in theory, like biases in front of a norm, flips whole steps.)"""
    script = str(Path(__file__).parent / "ddp_gradients.py")
    subprocess.run([sys.executable, script, str(tmp_path / "one.pt")], check=True, env=child_env(), timeout=120)
    torchrun = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    proc = subprocess.run([*torchrun, script, str(tmp_path / "two.pt")], capture_output=True, text=True,
                          env=child_env(), timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys() and any(k.startswith("D.") for k in one)
    scale = max(g.abs().max().item() for g in one.values())
    assert scale > 0
    for name, grad in one.items():
        err = (grad - two[name]).abs().max().item()
        assert err <= 1e-4 * scale, f"{name}: gradient differs by {err:.3g} (largest gradient {scale:.3g})"


def test_short_training_learns_the_label_to_image_mapping(tmp_path, builtin_32):
    """240 iterations on the built-in landscapes cut the L1 distance to the real validation images and the
    VGG loss to below 0.6x their untrained values, and put the right colours in the right regions: the
    per-region colour error is below 0.75x that of the same generator given shuffled label maps and 0.8x
    that of the training set's mean image (measured on an AVX-512 CPU: 0.146 against 0.288 and 0.235; at
    80 iterations it was 0.25, no better than the mean image, although L1 and VGG had already halved). The
    VGG network has random weights here: the real ImageNet file cannot be downloaded on this machine."""
    from dataclasses import replace

    from torchvision.models import vgg19

    from spade.data.dataset import build_dataset
    from spade.labels import semantic_input
    from spade.losses import VGGLoss
    from spade.nn.vgg import VGG19Features
    from spade.train.loop import train
    from spade.train.objective import GeneratorSide, init_weights

    torch.manual_seed(123)
    torch.save(vgg19().state_dict(), tmp_path / "vgg.pth")
    train_cfg = {"iterations": 240, "batch_size": 8, "vgg_loss": True, "vgg_weights": str(tmp_path / "vgg.pth"),
                 "log_every": 20, "checkpoint_every": 1000}  # fmt: skip
    settings = Settings.from_dict(tiny_params(builtin_32, tmp_path / "out", train=train_cfg))
    val = build_dataset(replace(settings.data, split="val"), settings.model, train=False, progress=False)
    batch = {k: torch.stack([val[i][k] for i in range(len(val))]) for k in ("label", "image")}
    vgg = VGGLoss(VGG19Features(tmp_path / "vgg.pth"), weight=1.0)

    def region_error(fake: torch.Tensor) -> float:
        """Colour error per labelled region: |mean colour of the fake - of the real| over the pixels of each
        (image, class) region of the real label maps, weighted by area. It asks for the right colours in the
        right places (sky blue where the map says sky), not for the texture a GAN invents, and an image
        that ignores the label map cannot meet it."""
        onehot = torch.nn.functional.one_hot(batch["label"][:, 0], settings.model.label_nc + 1).permute(0, 3, 1, 2)
        area = onehot.sum((2, 3)).clamp(min=1).unsqueeze(1)  # (N, 1, classes)
        per_region = [torch.einsum("nchw,nkhw->nck", x, onehot.float()) / area for x in (fake, batch["image"])]
        diff = (per_region[0] - per_region[1]).abs().mean(1)  # (N, classes)
        return ((diff * area[:, 0]).sum() / area.sum()).item()

    def score(generator: torch.nn.Module, labels: torch.Tensor | None = None) -> tuple[float, float, float]:
        with torch.no_grad():
            labels = batch["label"] if labels is None else labels
            fake = generator.eval()(semantic_input(labels, settings.model))
            l1 = (fake - batch["image"]).abs().mean().item()
            return l1, vgg(fake, batch["image"]).item(), region_error(fake)

    torch.manual_seed(0)
    untrained = GeneratorSide(settings.model)
    init_weights(untrained)
    l1_before, vgg_before, _ = score(untrained.generator)
    result = train(settings, progress=False)
    trained = Checkpoint.load(result.final_model).build_generator()
    l1_after, vgg_after, region_after = score(trained)
    assert l1_after < 0.6 * l1_before, (l1_before, l1_after)
    assert vgg_after < 0.6 * vgg_before, (vgg_before, vgg_after)
    # label-blind baselines: the training images' mean image, and the trained generator given another
    # scene's label map (what it would score if it had learned colours but not where they go)
    _, _, region_shuffled = score(trained, batch["label"].roll(1, dims=0))
    train_set = build_dataset(settings.data, settings.model, train=False, progress=False)
    mean_image = torch.stack([train_set[i]["image"] for i in range(len(train_set))]).mean(0, keepdim=True)
    region_mean = region_error(mean_image.expand_as(batch["image"]))
    assert region_after < 0.75 * region_shuffled, (region_after, region_shuffled)
    assert region_after < 0.8 * region_mean, (region_after, region_mean)
    assert {"G_VGG", "G_GAN", "G_feat", "D_real", "D_fake"} <= set(result.history[-1])


# --------------------------------------------------------------------------- resume for every model


def _preset_world(root: Path, preset: str) -> tuple[Path, dict, dict]:
    """A small dataset in the preset's own layout, with the data and model settings that read it."""
    from data_builders import make_ade20k, make_cityscapes, make_flat

    tiny = {"ngf": 8, "ndf": 8, "spade_hidden": 16}
    if preset == "coco":
        return make_flat(root, n=8, size=(40, 40)), {"layout": "coco", "load_size": 36}, {"crop_size": 32, **tiny}
    if preset == "ade20k":
        return make_ade20k(root, n=8, size=(40, 40)), {"layout": "ade20k", "load_size": 36}, {"crop_size": 32, **tiny}
    if preset == "cityscapes":  # 'more' up-sampling layers: the crop must be a multiple of 128 (128x64)
        data = make_cityscapes(root, cities={"aachen": 5, "bochum": 3}, size=(64, 32))
        return data, {"layout": "cityscapes"}, {"crop_size": 128, **tiny}
    raise AssertionError(preset)


RESUME_MODELS = ["coco", "ade20k", "cityscapes", "custom", "custom-vae", "coco-vae"]


@pytest.mark.parametrize("model", RESUME_MODELS)
def test_resume_from_any_checkpoint_is_exact_for_every_preset_and_the_vae(tmp_path, builtin_32, model):
    """8 iterations straight == the 4-iteration checkpoint of that run, resumed in a new run to 8.

    What a kill leaves is the checkpoint, so this is what kill and resume do (the kill itself is tested
    by the SIGTERM and SIGKILL tests). Every tensor of all three networks and both optimisers must match
    bit for bit. The multi-modal (VAE) model draws its sampling noise from torch's global generator:
    before the loader got a generator of its own, starting the data iterator on resume took one number
    from it that the straight run took at iteration 0, and 260 tensors differed.
    """
    preset, vae = model.removesuffix("-vae"), model.endswith("-vae")
    if preset == "custom":
        data, data_cfg, model_cfg = builtin_32, {}, {}
        params_for = lambda out: tiny_params(data, out, train={"iterations": 8}, model={"use_vae": vae})  # noqa: E731
    else:
        data, data_cfg, model_cfg = _preset_world(tmp_path / "data", preset)

        def params_for(out: Path) -> dict:
            params = tiny_params(data, out, train={"iterations": 8, "batch_size": 2}, data=data_cfg)
            params["model"] = {"preset": preset, "use_vae": vae, **model_cfg}
            return params

    from spade.train.loop import train

    train(Settings.from_dict(params_for(tmp_path / "a")), progress=False)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    halfway = tmp_path / "a" / "checkpoints" / "iter_00000004.pt"
    (tmp_path / "b" / "checkpoints" / halfway.name).write_bytes(halfway.read_bytes())
    train(Settings.from_dict(params_for(tmp_path / "b")), resume="", progress=False)

    a = Checkpoint.load(tmp_path / "a" / "checkpoints" / "iter_00000008.pt")
    b = Checkpoint.load(tmp_path / "b" / "checkpoints" / "iter_00000008.pt")
    assert a.config.preset == preset and a.config.use_vae == vae and (a.encoder is not None) == vae
    for part in ("generator", "encoder", "discriminator"):
        if getattr(a, part) is not None:
            diff = [k for k in getattr(a, part) if not torch.equal(getattr(a, part)[k], getattr(b, part)[k])]
            assert not diff, f"{part}: {len(diff)} tensors differ after resume, e.g. {diff[:3]}"
    for opt in ("optimizer_G", "optimizer_D"):
        for key, state in a.training[opt]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b.training[opt]["state"][key][name]), (opt, key, name)
    start = Checkpoint.load(halfway)
    assert not states_equal(start.generator, a.generator)  # training moved on after the checkpoint


def test_vae_kill_9_mid_run_and_resume_is_bit_identical(tmp_path, builtin_32):
    """The multi-modal model killed with SIGKILL (no chance to save) between checkpoints, then resumed.
    24 iterations: the 20 left after the 4th leave the poll (every 0.1 s) ample time to kill mid-run."""
    total = 24
    params = lambda out: tiny_params(builtin_32, out, train={"iterations": total}, model={"use_vae": True})  # noqa: E731
    run_train(write_params(tmp_path / "a.yaml", params(tmp_path / "a")))
    interrupted = write_params(tmp_path / "b.yaml", params(tmp_path / "b"))
    proc = subprocess.Popen([*SPADE, "train", "--params", str(interrupted)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=child_env())  # fmt: skip
    ckpt_dir = tmp_path / "b" / "checkpoints"
    wait_for(lambda: (ckpt_dir / "iter_00000004.pt").exists() or proc.poll() is not None, 120, "a checkpoint")
    proc.kill()
    proc.communicate(timeout=60)
    stopped_at = list_checkpoints(str(ckpt_dir))[-1][0]
    assert 4 <= stopped_at < total, f"the run was not killed mid-way (last checkpoint {stopped_at})"
    resumed = run_train(interrupted, "--resume")
    assert f"at iteration {stopped_at}" in resumed.stderr
    a = Checkpoint.load(tmp_path / "a" / "final.pt")
    b = Checkpoint.load(tmp_path / "b" / "final.pt")
    for part in ("generator", "encoder", "discriminator"):
        assert states_equal(getattr(a, part), getattr(b, part)), part


def test_resume_falls_back_past_a_truncated_newest_checkpoint_and_removes_stale_temporaries(tmp_path, builtin_32):
    params = write_params(tmp_path / "p.yaml", tiny_params(builtin_32, tmp_path / "r", train={"iterations": 6}))
    run_train(params)
    ckpt_dir = tmp_path / "r" / "checkpoints"
    assert [i for i, _ in list_checkpoints(str(ckpt_dir))] == [2, 4, 6]
    newest = ckpt_dir / "iter_00000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut off, a full disk
    stale = [ckpt_dir / ".iter_00000004.pt.k3j2_x.tmp", ckpt_dir / ".iter_00000006.pt.a8b_d9.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")  # what kills during Checkpoint.save leave
        old = time.time() - 20 * 60  # untouched for 20 minutes: nobody writes it any more
        os.utime(path, (old, old))
    in_progress = ckpt_dir / ".iter_00000008.pt.zz9_q1.tmp"  # fresh: maybe another process's write
    in_progress.write_bytes(b"being written")
    keep = ckpt_dir / "notes.tmp"
    keep.write_text("not ours")
    (tmp_path / "r" / "final.pt").unlink()

    proc = run_train(params, "--resume")
    assert "resume: skipped 1 unreadable checkpoint(s)" in proc.stderr and str(newest) in proc.stderr
    assert f"resuming from {ckpt_dir / 'iter_00000004.pt'} at iteration 4" in proc.stderr
    assert "removed 2 temporary file(s) of interrupted checkpoint writes" in proc.stderr
    assert not any(p.exists() for p in stale) and keep.exists() and in_progress.exists()
    assert Checkpoint.load(newest).training["iteration"] == 6  # written again by the resumed run
    assert (tmp_path / "r" / "final.pt").is_file()

    # nothing loadable at all: every file is named
    for _, name in list_checkpoints(str(ckpt_dir)):
        (ckpt_dir / name).write_bytes(b"garbage")
    proc = run_train(params, "--resume", check=False)
    assert proc.returncode == 1 and "none of the 3 checkpoint(s)" in proc.stderr
    assert all(str(ckpt_dir / name) in proc.stderr for _, name in list_checkpoints(str(ckpt_dir)))


def test_torchrun_resume_passes_over_a_truncated_checkpoint_on_every_rank_alike(tmp_path, builtin_32):
    """Rank 0 chooses the checkpoint and the others load that one: all resume from iteration 2 here, and
    the trainer's replica check (checksums of every rank's weights at each save) finds them equal."""
    params = tiny_params(builtin_32, tmp_path / "ddp", train={"iterations": 4, "checkpoint_every": 2})
    ddp = write_params(tmp_path / "ddp.yaml", params)
    torchrun = Path(sys.executable).parent / "torchrun"

    def launch(*extra: str) -> subprocess.CompletedProcess:
        cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "spade", "train"]
        return subprocess.run([*cmd, "--params", str(ddp), *extra], capture_output=True, text=True,
                              env=child_env(), timeout=300)  # fmt: skip

    assert launch().returncode == 0
    ckpt_dir = tmp_path / "ddp" / "checkpoints"
    newest = ckpt_dir / "iter_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    (tmp_path / "ddp" / "final.pt").unlink()
    proc = launch("--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("resume: skipped 1 unreadable checkpoint(s)") == 1  # said once, by rank 0
    assert f"resuming from {ckpt_dir / 'iter_00000002.pt'} at iteration 2" in proc.stderr
    resumed = Checkpoint.load(newest)
    sums = resumed.training["replica_checksums"]
    assert resumed.training["iteration"] == 4 and len(sums) == 2 and sums[0] == sums[1]
