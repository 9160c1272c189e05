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


def test_no_entrypoint_so_every_runner_sets_the_whole_command():
    """kfp.local's DockerRunner sets only the container's command (Docker's CMD): an ENTRYPOINT would be put
    before it. So the image has none, its CMD is `spade --help`, and every manifest names its command."""
    assert not [args for keyword, args in instructions() if keyword == "ENTRYPOINT"]
    [cmd] = [args for keyword, args in instructions() if keyword == "CMD"]
    assert json.loads(cmd) == ["spade", "--help"]  # exec form
    assert PYPROJECT["project"]["scripts"]["spade"] == "spade.cli:main"
    for tree in TREES:
        for doc in objects(tree, "Deployment"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if "spade" in c["image"]:
                    assert c.get("command"), (tree, doc["metadata"]["name"], c["name"])


def pip_installs() -> list[tuple[int, list[str], list[str]]]:
    """(instruction index, options, arguments) of each `pip install` of this project (not the CPU torch wheels)."""
    found = []
    for index, cmd in commands():
        if cmd.startswith("pip install ") and "--index-url" not in cmd:
            args = shlex.split(cmd)[2:]
            found.append((index, [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]))
    return found


def copies() -> list[tuple[int, list[str], str]]:
    """(instruction index, sources, destination) of each COPY."""
    found = []
    for index, (keyword, args) in enumerate(instructions()):
        if keyword == "COPY":
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            found.append((index, sources, dest))
    return found


def requirements_of_the_image() -> list[str]:
    """What scripts/requirements.py lists for the Dockerfile's EXTRAS (run as the Dockerfile runs it)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "requirements.py"), str(ROOT / "pyproject.toml"),
         args_defaults()["EXTRAS"]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.split("\n")[:-1]


def test_the_dependencies_are_the_projects_with_the_serve_pipeline_and_tracking_extras(tmp_path):
    """Checked against the package metadata setuptools builds from pyproject.toml (pip's dry-run report)."""
    from packaging.markers import default_environment

    for rel in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / rel, tmp_path / rel)
    metadata = dry_run(tmp_path, ".", tmp_path / "report.json")["metadata"]
    extras = args_defaults()["EXTRAS"].split(",")
    assert {"serve", "pipeline", "tracking"} <= set(extras)
    listed = {Requirement(line).name for line in requirements_of_the_image()}
    expected = set()
    for spec in metadata["requires_dist"]:
        req = Requirement(spec)
        if req.name == "spade":
            continue
        if req.marker is None or any(req.marker.evaluate({**default_environment(), "extra": e}) for e in extras):
            expected.add(req.name)
    build = {Requirement(r).name for r in PYPROJECT["build-system"]["requires"]}
    assert listed == expected | build
    # mlflow server's postgresql:// store: psycopg for SQLAlchemy 2.1, psycopg2 for older
    assert {"psycopg", "psycopg2-binary"} <= listed
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "requirements.py"), str(ROOT / "pyproject.toml"), "serve,nope"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "nope" in bad.stderr


def test_a_source_edit_does_not_reinstall_the_dependencies():
    """The dependency layer reads pyproject.toml (and the lister) only; the sources come later, --no-deps."""
    (metadata_copy, metadata, meta_dest), (sources_copy, sources, dest) = copies()
    (deps_run, deps_options, deps_args), (project_run, project_options, project) = pip_installs()
    assert sorted(metadata) == ["pyproject.toml", "scripts/requirements.py"] and sources == ["."]
    assert dest.rstrip("/") == "/app" and "README.md" not in metadata  # a README edit rebuilds in seconds
    assert deps_options == ["-r"] and deps_args[0].startswith(meta_dest)
    assert metadata_copy < deps_run < sources_copy < project_run
    assert set(project_options) == {"--no-deps", "--no-build-isolation"} and project == ["."]


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
        "pyproject.toml scripts/requirements.py /tmp/spade-meta/",
        "--chown=spade:spade . /app",
    ]
    for _, sources, _ in copies():
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


def test_pip_resolves_the_package_from_the_build_context(tmp_path):
    """The sources' install step from a copy of the build context: this project, the version its metadata says."""
    for rel in build_context():
        (tmp_path / "context" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / "context" / rel)
    sources = dry_run(tmp_path / "context", ".", tmp_path / "project.json")
    assert sources["metadata"]["version"] == PYPROJECT["project"]["version"]
