"""Exit 0 when this project is installed (editable, from this checkout) with every requirement of
pyproject.toml and the extras named in argv[1] satisfied; exit 1 and say what is missing otherwise.

scripts/setup.sh runs it to skip pip on a second run. It must run before the project is installed,
so it imports only the standard library and ``packaging`` (which the project's own dependencies bring).
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def missing(extras: list[str]) -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: no reader of pyproject.toml here, so always install
        return ["Python < 3.11 cannot read pyproject.toml without a package"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    problems = []
    try:
        dist = metadata.distribution(project["name"])
    except metadata.PackageNotFoundError:
        return [f"{project['name']} is not installed"]
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if url.removeprefix("file://") != str(ROOT):
        problems.append(f"{project['name']} is installed from {url or 'an index'}, not this checkout")
    if dist.version != project["version"]:
        problems.append(f"{project['name']} {dist.version} installed, pyproject says {project['version']}")
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project.get("optional-dependencies", {}).get(extra, [])
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} does not satisfy {req.specifier}")
    return problems


if __name__ == "__main__":
    extras = [e for e in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if e]
    problems = missing(extras)
    for problem in problems:
        print(problem)
    sys.exit(1 if problems else 0)
