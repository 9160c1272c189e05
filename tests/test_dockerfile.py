"""The Dockerfile builds the one image every component runs (no Docker engine here: it is read, not built).

Checked: the CUDA base image by default and the CPU variant by build arguments, TorchServe's Java 17, a
non-root user whose uid the Kubernetes manifests run as, `spade` as the entrypoint, and that its
`pip install` installs this project: the extras it asks for exist, the build context left by .dockerignore
holds what the build needs, and pip resolves the package from a copy of exactly that context (dry run,
offline, no dependencies).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def args_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions():
        if keyword == "ARG":
            name, _, value = args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def runs() -> str:
    return "\n".join(args for keyword, args in instructions() if keyword == "RUN")


def comments() -> str:
    return "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("#"))


def test_cuda_base_image_by_default_and_a_cpu_variant_by_build_args():
    assert instructions()[0] == ("ARG", f"BASE_IMAGE={args_defaults()['BASE_IMAGE']}")
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+(\.\d+)?-cuda12\.\d+-cudnn9-runtime", args_defaults()["BASE_IMAGE"])
    assert [args for keyword, args in instructions() if keyword == "FROM"] == ["${BASE_IMAGE}"]
    # the CPU recipe documented in the header, and the CPU torch wheels installed when its index is given
    cpu = re.search(r"--build-arg BASE_IMAGE=python:(\d+)\.(\d+)-slim-bookworm", comments())
    assert cpu, "CPU variant not documented"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{cpu[1]}.{cpu[2]}")
    assert "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in comments()
    assert args_defaults()["TORCH_INDEX_URL"] == ""  # CUDA image: keep its torch
    assert re.search(
        r'if \[ -n "\$\{TORCH_INDEX_URL\}" \]; then pip install --index-url "\$\{TORCH_INDEX_URL\}" torch', runs()
    )


def test_torchserve_gets_java_17():
    assert re.search(r"apt-get install -y --no-install-recommends openjdk-17-jre-headless", runs())
    assert "serve" in PYPROJECT["project"]["optional-dependencies"]


def test_runs_as_a_non_root_user_the_manifests_agree_with():
    users = [args for keyword, args in instructions() if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    # USER comes after every RUN: nothing installs as the runtime user, nothing runs as root at runtime
    keywords = [keyword for keyword, _ in instructions()]
    assert max(i for i, k in enumerate(keywords) if k == "RUN") < keywords.index("USER")
    uid = args_defaults()["APP_UID"]
    assert re.search(rf"useradd .*--uid \$\{{APP_UID\}} .*{users[-1]}$", runs(), re.M)
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests"
    for tree in ("base", "overlays/dev", "overlays/prod"):
        out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / tree)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        for doc in yaml.safe_load_all(out.stdout):
            if doc and doc["kind"] == "Deployment":
                pod = doc["spec"]["template"]["spec"]
                if any("spade" in c["image"] for c in pod["containers"]):
                    assert str(pod["securityContext"]["runAsUser"]) == uid, doc["metadata"]["name"]


def test_spade_is_the_entrypoint():
    [entrypoint] = [args for keyword, args in instructions() if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["spade"]  # exec form
    assert PYPROJECT["project"]["scripts"]["spade"] == "spade.cli:main"


def pip_install_specs() -> list[str]:
    [line] = [cmd for cmd in runs().split("&&") if cmd.strip().startswith("pip install ") and "--index-url" not in cmd]
    specs = [s for s in shlex.split(line)[2:] if not s.startswith("-")]
    return [s.replace("${EXTRAS}", args_defaults()["EXTRAS"]) for s in specs]


def test_pip_installs_this_project_with_the_serve_and_pipeline_extras():
    project, *others = pip_install_specs()
    m = re.fullmatch(r"\.\[([\w,-]+)\]", project)
    assert m, project
    extras = m[1].split(",")
    assert {"serve", "pipeline", "tracking"} <= set(extras)
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras) <= set(optional)
    for spec in others:
        Requirement(spec)  # well-formed
    # mlflow server's postgresql:// store
    assert any(Requirement(s).name == "psycopg2-binary" for s in optional["tracking"])


def dockerignore_patterns() -> list[re.Pattern]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not modelled here"
        regex = ""
        i, line = 0, line.strip("/")
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append(re.compile(regex))
    return patterns


def in_context(rel: str, patterns: list[re.Pattern]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # an ignored folder drops its contents
    return not any(p.fullmatch(prefix) for p in patterns for prefix in prefixes)


def build_context() -> list[str]:
    patterns = dockerignore_patterns()
    files = []
    for folder, dirs, names in os.walk(ROOT):
        base = "" if Path(folder) == ROOT else Path(folder).relative_to(ROOT).as_posix()
        dirs[:] = [d for d in dirs if in_context(f"{base}/{d}".lstrip("/"), patterns)]  # prune ignored folders
        files += [rel for name in names if in_context(rel := f"{base}/{name}".lstrip("/"), patterns)]
    return sorted(files)


def test_dockerignore_keeps_the_sources_and_drops_local_state():
    patterns = dockerignore_patterns()
    for dropped in (".venv/bin/python", "data/x.png", "runs/a/ckpt.pt", "mlruns.db", "mlruns/0/meta.yaml",
                    ".git/HEAD", "spade/__pycache__/cli.cpython-311.pyc", "mlartifacts/1/a"):  # fmt: skip
        assert not in_context(dropped, patterns), dropped
    context = build_context()
    for needed in ("pyproject.toml", "README.md", "params.yaml", "spade/cli.py"):
        assert needed in context, needed  # README.md: pyproject's readme, read by the build
    copies = [args for keyword, args in instructions() if keyword == "COPY"]
    assert copies == ["--chown=spade:spade . /app"]


@pytest.mark.skipif(sys.platform == "win32", reason="posix paths")
def test_pip_resolves_the_package_from_the_build_context(tmp_path):
    context = tmp_path / "context"
    for rel in build_context():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    project, *_ = pip_install_specs()
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation"]
    cmd += ["--quiet", "--report", str(report), project]
    out = subprocess.run(cmd, cwd=context, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    [install] = json.loads(report.read_text())["install"]
    assert install["metadata"]["name"] == PYPROJECT["project"]["name"]
    assert set(install["requested_extras"]) <= set(install["metadata"]["provides_extra"])
    assert {"serve", "pipeline"} <= set(install["requested_extras"])
