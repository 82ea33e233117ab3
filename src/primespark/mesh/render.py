"""One wg-quick config per host, from a Jinja2 template (StrictUndefined), written with mode 0600."""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, Template

from primespark.folders import SharedFolder, private_folder
from primespark.mesh.keys import MeshKeys
from primespark.mesh.plan import MeshPlan


@lru_cache(maxsize=1)
def _template() -> Template:
    env = Environment(loader=PackageLoader("primespark.mesh", "templates"), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)  # noqa: S701
    return env.get_template("wg-quick.conf.j2")


def render_host(plan: MeshPlan, keys: MeshKeys, host: str, private_key: str | None = None) -> str:
    config = plan.hosts[host]
    psks = {p.name: keys.preshared_key(host, p.name) for p in config.peers if p.preshared_key}
    return _template().render(
        mesh=plan.mesh, fleet=plan.fleet, host=config, prefixlen=plan.prefixlen, listen_port=plan.spec.listen_port,
        mtu=plan.spec.mtu, private_key=private_key or keys.private_key(host), preshared_keys=psks,
    )


def config_path(out: Path, plan: MeshPlan, host: str) -> Path:
    """Flat: `<host>.<interface>.conf` (host names hold no dots), one folder however many hosts."""
    return out / f"{host}.{plan.spec.interface}.conf"


def _replace(path: Path, text: str) -> None:
    """Temporary file (0600 from the start) renamed over the old one: readers see old or new, never half.
    No fsync: these files are derived and re-rendered from the plan at any time; the plan itself is synced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_folder(out: Path, plan: MeshPlan) -> Path:
    """Where the configs go: `out` when it is missing (made 0700) or already private; inside a folder open to
    others (`--out /tmp`), a folder of our own in it, `<out>/spark-mesh-<fleet>-<mesh>` — never a chmod of `out`."""
    fix = "name a folder that does not exist yet (it is made 0700) or one of your own with mode 0700"
    try:
        return private_folder(out, "the output folder", fix, make_parents=True)
    except SharedFolder:
        return private_folder(out / f"spark-mesh-{plan.fleet}-{plan.mesh}", "the output folder", fix)


def render_all(plan: MeshPlan, keys: MeshKeys, out: Path, hosts: list[str] | None = None) -> list[Path]:
    """Write `<folder>/<host>.<interface>.conf` for each host (folder 0700, files 0600) into `output_folder`;
    unchanged files stay."""
    out = output_folder(out, plan)
    written = []
    for host in hosts or list(plan.hosts):
        path = config_path(out, plan, host)
        text = render_host(plan, keys, host)
        try:
            same = path.read_text(encoding="utf-8") == text and (path.stat().st_mode & 0o077) == 0
        except FileNotFoundError:
            same = False
        if not same:
            _replace(path, text)
        written.append(path)
    return written
