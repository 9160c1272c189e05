"""Checkpoints in S3 (a real `moto_server` on 127.0.0.1): pruned as they are written, and an interrupted run
resumed from s3://bucket/prefix ends bit-identical to a straight run."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from spade.checkpoints import Checkpoint
from spade.data.synthetic import generate_builtin_dataset
from train_helpers import SPADE, child_env, moto_s3, tiny_params, wait_for, write_params

BUCKET = "spade-ckpts"


@pytest.fixture(scope="module")
def builtin_32(tmp_path_factory) -> Path:
    return generate_builtin_dataset(
        tmp_path_factory.mktemp("builtin") / "data", count=24, val_count=8, size=32, progress=False
    )


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one empty bucket: yields (the environment pointing boto3 at it, a client)."""
    with moto_s3(tmp_path_factory.mktemp("moto"), BUCKET) as env_and_client:
        yield env_and_client


def keys(client, prefix: str) -> list[str]:  # noqa: ANN001
    found = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(obj["Key"] for obj in found)


def load(client, key: str, folder: Path) -> Checkpoint:  # noqa: ANN001
    local = folder / key.replace("/", "_")
    client.download_file(BUCKET, key, str(local))
    return Checkpoint.load(local)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def training(params_file: Path, log: Path, env: dict, *args: str):
    """`spade train` in the background, stdout and stderr to `log`; killed if the test fails."""
    with log.open("w") as out:
        proc = subprocess.Popen([*SPADE, "train", "--params", str(params_file), *args], stdout=out,
                                stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_resume_from_s3_is_exact_and_old_checkpoints_are_pruned(tmp_path, builtin_32, s3):
    total, keep = 12, 2
    s3_env, client = s3
    env = child_env(**s3_env)
    train = {"iterations": total, "checkpoint_every": 2, "keep_checkpoints": keep}

    # the reference, straight through (--resume of an empty prefix starts from scratch), runs alongside
    # a run that is interrupted after a few checkpoints (so that pruning has happened)
    straight = write_params(
        tmp_path / "straight.yaml",
        tiny_params(builtin_32, tmp_path / "straight", train={**train, "checkpoint_dir": f"s3://{BUCKET}/straight"}),
    )
    prefix = "run1/checkpoints"
    params = write_params(
        tmp_path / "run1.yaml",
        tiny_params(builtin_32, tmp_path / "run1", train={**train, "checkpoint_dir": f"s3://{BUCKET}/{prefix}"}),
    )
    straight_log, log = tmp_path / "straight.log", tmp_path / "run1.log"
    with (
        training(straight, straight_log, env, "--resume", f"s3://{BUCKET}/empty-prefix") as reference,
        training(params, log, env) as proc,
    ):
        wait_for(lambda: f"{prefix}/iter_00000006.pt" in keys(client, prefix) or proc.poll() is not None, 120,
                 "the third checkpoint in the bucket", interval=0.05)  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
        assert reference.wait(timeout=300) == 0, straight_log.read_text()[-3000:]
    assert f"no checkpoint in s3://{BUCKET}/empty-prefix; starting from scratch" in straight_log.read_text()
    assert keys(client, "straight/") == [f"straight/iter_{i:08d}.pt" for i in (total - 2, total)]

    assert "continue with --resume" in log.read_text()
    stored = keys(client, prefix)
    assert len(stored) == keep, f"expected the newest {keep} checkpoints, found {stored}"
    stopped_at = load(client, stored[-1], tmp_path).training["iteration"]
    assert 6 <= stopped_at < total, f"the run was not interrupted mid-way (stopped at {stopped_at})"
    assert stored[-1] == f"{prefix}/iter_{stopped_at:08d}.pt"
    assert not (tmp_path / "run1" / "checkpoints").exists(), "checkpoints were written locally, not to S3"

    proc = subprocess.run([*SPADE, "train", "--params", str(params), "--resume", f"s3://{BUCKET}/{prefix}"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = f"s3://{BUCKET}/{prefix}/iter_{stopped_at:08d}.pt"
    assert f"resuming from {source} at iteration {stopped_at}" in proc.stderr
    assert keys(client, prefix)[-1] == f"{prefix}/iter_{total:08d}.pt" and len(keys(client, prefix)) == keep

    a = load(client, f"straight/iter_{total:08d}.pt", tmp_path)
    b = load(client, f"{prefix}/iter_{total:08d}.pt", tmp_path)
    assert states_equal(a.generator, b.generator)
    assert states_equal(a.discriminator, b.discriminator)
    opt_a, opt_b = a.training["optimizer_D"]["state"], b.training["optimizer_D"]["state"]
    assert opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)
    assert states_equal(Checkpoint.load(tmp_path / "run1" / "final.pt").generator, a.generator)
    # and training did change the weights (the comparison is not between two untouched models)
    assert not states_equal(load(client, f"straight/iter_{total - 2:08d}.pt", tmp_path).generator, a.generator)
