"""The Dockerfile builds the one image every component runs (no Docker engine here: it is read, not built).

Checked: the CUDA base image by default and the CPU variant by build arguments, TorchServe's Java 17, a
non-root user whose uid the Kubernetes manifests run as, `spade` as the entrypoint, and that its
`pip install`s install this project: the dependencies (with extras that exist) from the project's metadata
copied alone, then the sources without dependencies; the build context left by .dockerignore holds what the
build needs, and pip resolves the package from a copy of exactly what each step has (dry run, offline, no
dependencies).
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
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from test_k8s import TREES, objects

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


def commands() -> list[tuple[int, str]]:
    """(instruction index, command) of every `&&`-joined command of the RUN instructions."""
    return [
        (i, cmd.strip())
        for i, (keyword, args) in enumerate(instructions())
        if keyword == "RUN"
        for cmd in args.split("&&")
    ]


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


def test_runs_as_a_non_root_user_the_manifests_agree_with():
    users = [args for keyword, args in instructions() if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    # USER comes after every RUN: nothing installs as the runtime user, nothing runs as root at runtime
    keywords = [keyword for keyword, _ in instructions()]
    assert max(i for i, k in enumerate(keywords) if k == "RUN") < keywords.index("USER")
    uid = args_defaults()["APP_UID"]
    assert re.search(rf"useradd .*--uid \$\{{APP_UID\}} .*{users[-1]}$", runs(), re.M)
    for tree in TREES:  # the manifests test_k8s renders (kubectl kustomize, once per tree)
        ours = [
            doc
            for doc in objects(tree, "Deployment")
            if any("spade" in c["image"] for c in doc["spec"]["template"]["spec"]["containers"])
        ]
        assert ours, f"{tree}: no Deployment runs the spade image"
        for doc in ours:
            assert str(doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == uid, doc["metadata"]["name"]


def test_spade_is_the_entrypoint():
    [entrypoint] = [args for keyword, args in instructions() if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["spade"]  # exec form
    assert PYPROJECT["project"]["scripts"]["spade"] == "spade.cli:main"


def pip_installs() -> list[tuple[int, list[str], list[str]]]:
    """(instruction index, options, specs) of each `pip install` of this project (not the CPU torch wheels)."""
    found = []
    for index, cmd in commands():
        if cmd.startswith("pip install ") and "--index-url" not in cmd:
            args = [a.replace("${EXTRAS}", args_defaults()["EXTRAS"]) for a in shlex.split(cmd)[2:]]
            found.append((index, [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]))
    return found


def copies() -> list[tuple[int, list[str]]]:
    """(instruction index, sources) of each COPY into /app."""
    found = []
    for index, (keyword, args) in enumerate(instructions()):
        if keyword == "COPY":
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            assert dest.rstrip("/") == "/app", args
            found.append((index, sources))
    return found


def test_pip_installs_this_project_with_the_serve_and_pipeline_extras():
    (_, _, [deps, *others]), (_, _, [project]) = pip_installs()
    m = re.fullmatch(r"\.\[([\w,-]+)\]", deps)
    assert m, deps
    extras = m[1].split(",")
    assert {"serve", "pipeline", "tracking"} <= set(extras)
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras) <= set(optional)
    for spec in others:
        Requirement(spec)  # well-formed
    assert project == "."
    # mlflow server's postgresql:// store
    assert any(Requirement(s).name == "psycopg2-binary" for s in optional["tracking"])


def test_a_source_edit_does_not_reinstall_the_dependencies():
    """Dependencies come from the metadata, copied alone; the sources come later and install with --no-deps."""
    (metadata_copy, metadata), (sources_copy, sources) = copies()
    (deps_run, deps_options, _), (project_run, project_options, _) = pip_installs()
    assert sorted(metadata) == ["README.md", "pyproject.toml"] and sources == ["."]
    assert metadata_copy < deps_run < sources_copy < project_run
    assert "--no-deps" not in deps_options and "--no-deps" in project_options
    assert PYPROJECT["project"]["readme"] in metadata  # the build reads it


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
    assert [args for keyword, args in instructions() if keyword == "COPY"] == [
        "--chown=spade:spade pyproject.toml README.md /app/",
        "--chown=spade:spade . /app",
    ]
    for _, sources in copies():
        assert all(s == "." or s in context for s in sources), sources


def dry_run(context: Path, spec: str, report: Path) -> dict:
    """What `pip install SPEC` in `context` would install (offline, no dependencies, no build isolation)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation"]
    cmd += ["--quiet", "--report", str(report), spec]
    out = subprocess.run(cmd, cwd=context, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    [install] = json.loads(report.read_text())["install"]
    assert install["metadata"]["name"] == PYPROJECT["project"]["name"]
    return install


@pytest.mark.skipif(sys.platform == "win32", reason="posix paths")
def test_pip_resolves_the_package_from_the_build_context(tmp_path):
    """Each install step from a copy of what the image holds then: the metadata alone, then the whole context."""
    (_, metadata), _ = copies()
    (_, _, [deps, *_]), (_, _, [project]) = pip_installs()
    for name, files in (("metadata", metadata), ("context", build_context())):
        for rel in files:
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tmp_path / name / rel)
    install = dry_run(tmp_path / "metadata", deps, tmp_path / "deps.json")
    assert set(install["requested_extras"]) <= set(install["metadata"]["provides_extra"])
    assert {"serve", "pipeline"} <= set(install["requested_extras"])
    sources = dry_run(tmp_path / "context", project, tmp_path / "project.json")
    assert sources["metadata"]["version"] == install["metadata"]["version"]  # the same package, now with code
