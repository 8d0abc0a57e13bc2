"""Do the image's installed versions satisfy what nemo_minitron and megatron-core declare?

Checks every requirement of ``nemo_minitron`` (with its ``gpu`` extra: Transformer Engine) and of
``megatron-core`` (with the Transformer Engine range of its ``dev`` extra, the set its own CI image tests;
the extra's other packages are optional features this project does not use) against the installed
distributions. Pre-releases count: the NGC base's torch is one (``2.10.0a0+<commit>.nv25.11``). Prints one
line per requirement and exits 1 if any is unmet. ``docker build`` runs it as its last step; re-run it in a
built image with ``docker run --rm IMAGE python /opt/nemo_minitron/docker/check_versions.py``.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Callable, Optional

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

# distribution -> the extra whose Transformer Engine requirement is checked with its plain requirements
CHECKED = {"nemo_minitron": "gpu", "megatron-core": "dev"}
FROM_EXTRAS = {"transformer-engine"}


def installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirements(dist: str, extra: str) -> list[Requirement]:
    """``dist``'s plain requirements, and those of ``extra`` named in FROM_EXTRAS."""
    found = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            found.append(req)
        elif canonicalize_name(req.name) in FROM_EXTRAS and req.marker.evaluate({"extra": extra}):
            found.append(req)
    return found


def problem(req: Requirement, version: Optional[str]) -> Optional[str]:
    """Why the installed ``version`` (None: not installed) does not satisfy ``req``; None when it does."""
    if version is None:
        return "not installed"
    try:
        parsed = Version(version)
    except InvalidVersion:
        return f"{version} is not a PEP 440 version"
    if not req.specifier.contains(parsed, prereleases=True):
        return f"{version} is outside {req.specifier}"
    return None


def check(version_of: Callable[[str], Optional[str]] = installed_version) -> list[str]:
    """One line per checked requirement, ``FAIL`` first on the unmet ones."""
    lines = []
    for dist, extra in CHECKED.items():
        owner = f"{dist} {version_of(dist)}"
        for req in requirements(dist, extra):
            version = version_of(req.name)
            why = problem(req, version)
            status = "ok  " if why is None else "FAIL"
            lines.append(f"{status} {owner} needs {req.name}{req.specifier or ''}: "
                         f"{why or f'{version} installed'}")
    return lines


def main() -> int:
    missing = [dist for dist in CHECKED if installed_version(dist) is None]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 1
    lines = check()
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
