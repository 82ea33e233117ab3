"""The Debian mirror this machine already uses, read from its apt sources (never written down anywhere)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from primespark.errors import UserError

APT_DIR = Path("/etc/apt")


@dataclass(frozen=True)
class AptSource:
    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str


def parse_one_line(text: str, origin: str) -> list[AptSource]:
    """The classic `deb [options] URI SUITE COMPONENT...` format."""
    sources = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # options such as [signed-by=...]
        fields = line.split()
        if len(fields) < 3 or fields[0] not in ("deb", "deb-src"):
            continue
        sources.append(AptSource((fields[0],), (fields[1],), (fields[2],), tuple(fields[3:]), origin))
    return sources


def parse_deb822(text: str, origin: str) -> list[AptSource]:
    """The `.sources` format: stanzas of `Field: value` separated by blank lines."""
    sources = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key is not None:
                fields[key] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            if sep and name.strip():
                key = name.strip().lower()
                fields[key] = value.strip()
        if not fields.get("uris") or fields.get("enabled", "yes").lower() == "no":
            continue
        sources.append(AptSource(
            tuple(fields.get("types", "deb").split()),
            tuple(fields["uris"].split()),
            tuple(fields.get("suites", "").split()),
            tuple(fields.get("components", "").split()),
            origin,
        ))
    return sources


def read_sources(apt_dir: Path = APT_DIR) -> list[AptSource]:
    """Every source apt itself reads: sources.list, then sources.list.d/*.list and *.sources."""
    sources: list[AptSource] = []
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        sources += parse_one_line(main_list.read_text(), str(main_list))
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += parse_one_line(path.read_text(), str(path))
            elif path.suffix == ".sources":
                sources += parse_deb822(path.read_text(), str(path))
    return sources


def _usable(source: AptSource) -> list[str]:
    if "deb" not in source.types:
        return []
    return [u.rstrip("/") for u in source.uris if re.match(r"^(https?|file)://", u)]


def debian_mirror(suite: str, sources: list[AptSource] | None = None) -> str:
    """The first `deb` source that carries `suite` itself (not -updates or -security)."""
    sources = read_sources() if sources is None else sources
    for source in sources:
        if suite in source.suites and "main" in source.components:
            uris = _usable(source)
            if uris:
                return uris[0]
    raise UserError(
        f"no apt source on this machine carries Debian {suite} (main); the lab image is built from it",
        fix=f"add a `deb <mirror> {suite} main` line to /etc/apt/sources.list (or a .sources file) "
        "and run `apt-get update`",
    )


def suite_sources(suite: str, sources: list[AptSource] | None = None) -> list[str]:
    """One-line apt sources for the image: this machine's entries for `suite`, -updates and -security."""
    sources = read_sources() if sources is None else sources
    lines: list[str] = []
    for source in sources:
        suites = [s for s in source.suites if s == suite or s.startswith(f"{suite}-")]
        for uri in _usable(source):
            for s in suites:
                line = f"deb {uri} {s} {' '.join(source.components) or 'main'}"
                if line not in lines:
                    lines.append(line)
    return lines
