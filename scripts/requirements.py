"""Print the requirements of a pyproject.toml's project with some of its extras, one per line.

    python scripts/requirements.py pyproject.toml serve,pipeline,tracking

The Dockerfile installs these before it copies the sources, so that its dependency layer depends on
pyproject.toml alone. Extras that name the project itself (`spade[serve,dvc]`) are expanded; the build
backend's requirements ([build-system] requires) come too, so the sources install without network later.
Standard library only: it runs on the base image's bare Python.
"""

import re
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    name = project["name"].lower()
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"error: no such extras in {name}: {', '.join(unknown)} (it has {', '.join(optional)})")
    out: list[str] = []
    seen: set[str] = set()

    def add(specs: list[str]) -> None:
        for spec in specs:
            m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*\[([^\]]*)\]\s*", spec)
            if m and m[1].lower().replace("_", "-") == name:
                for extra in (e.strip() for e in m[2].split(",")):
                    if extra and extra not in seen:
                        seen.add(extra)
                        add(optional[extra])
            elif spec not in out:
                out.append(spec)

    add(list(pyproject.get("build-system", {}).get("requires", [])))
    add(list(project.get("dependencies", [])))
    for extra in extras:
        if extra not in seen:
            seen.add(extra)
            add(optional[extra])
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    with open(argv[0], "rb") as f:
        pyproject = tomllib.load(f)
    print("\n".join(requirements(pyproject, [e.strip() for e in argv[1].split(",") if e.strip()])))


if __name__ == "__main__":
    main(sys.argv[1:])
