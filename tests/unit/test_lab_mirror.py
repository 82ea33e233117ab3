"""Reading the Debian mirror from apt sources, in both formats apt knows."""

from __future__ import annotations

import pytest

from primespark.errors import UserError
from primespark.lab.mirror import debian_mirror, parse_deb822, parse_one_line, read_sources, suite_sources

DEB822 = """\
Types: deb deb-src
# a comment inside the stanza
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: trixie
Components: main
"""

ONE_LINE = """\
# deb http://commented.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] https://mirror.example/debian bookworm main non-free
deb-src http://src.example/debian bookworm main
deb http://security.example/debian-security bookworm-security main   # trailing comment
"""


def test_deb822_stanzas_types_suites_and_disabled_ones():
    sources = parse_deb822(DEB822, "x.sources")
    assert [s.uris for s in sources] == [("http://mirror.example/debian/",),
                                         ("http://security.example/debian-security",)]
    assert sources[0].types == ("deb", "deb-src")
    assert sources[0].suites == ("bookworm", "bookworm-updates")
    assert sources[0].components == ("main", "contrib")


def test_deb822_continuation_lines_join_the_field():
    sources = parse_deb822("Types: deb\nURIs: http://a.example/debian\n  http://b.example/debian\n"
                           "Suites: bookworm\nComponents: main\n", "y.sources")
    assert sources[0].uris == ("http://a.example/debian", "http://b.example/debian")


def test_one_line_format_skips_comments_and_options():
    sources = parse_one_line(ONE_LINE, "sources.list")
    assert [(s.types[0], s.uris[0], s.suites[0]) for s in sources] == [
        ("deb", "https://mirror.example/debian", "bookworm"),
        ("deb-src", "http://src.example/debian", "bookworm"),
        ("deb", "http://security.example/debian-security", "bookworm-security"),
    ]
    assert sources[0].components == ("main", "non-free")


def test_mirror_is_the_source_of_the_release_itself_not_security_or_src():
    sources = parse_one_line("deb http://security.example/ds bookworm-security main\n"
                             "deb-src http://src.example/debian bookworm main\n", "a") + \
        parse_deb822(DEB822, "b")
    assert debian_mirror("bookworm", sources) == "http://mirror.example/debian"


def test_no_source_for_the_release_is_a_clear_error():
    with pytest.raises(UserError, match="no apt source on this machine carries Debian bookworm") as err:
        debian_mirror("bookworm", parse_one_line("deb http://m.example/debian trixie main\n", "a"))
    assert "sources.list" in err.value.fix


def test_read_sources_reads_list_and_sources_files_only(tmp_path):
    (tmp_path / "sources.list").write_text("deb http://one.example/debian bookworm main\n")
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(DEB822)
    (parts / "extra.list").write_text("deb http://three.example/debian bookworm main\n")
    (parts / "old.list.disabled").write_text("deb http://never.example/debian bookworm main\n")
    uris = [s.uris[0] for s in read_sources(tmp_path)]
    assert uris == ["http://one.example/debian", "http://mirror.example/debian/",
                    "http://security.example/debian-security", "http://three.example/debian"]
    assert debian_mirror("bookworm", read_sources(tmp_path)) == "http://one.example/debian"


def test_suite_sources_for_the_image_keep_updates_and_security():
    lines = suite_sources("bookworm", parse_deb822(DEB822, "x"))
    assert lines == [
        "deb http://mirror.example/debian bookworm main contrib",
        "deb http://mirror.example/debian bookworm-updates main contrib",
        "deb http://security.example/debian-security bookworm-security main",
    ]


def test_this_machine_has_a_mirror_for_the_lab_release():
    # The lab image is built from it; the machine's sources are read, nothing is hard-coded.
    from pathlib import Path

    release = (Path(__file__).resolve().parents[2] / "images" / "lab" / "release").read_text().strip()
    try:
        mirror = debian_mirror(release)
    except UserError as exc:
        pytest.skip(f"this machine has no apt source for {release}: {exc.message}")
    assert mirror.startswith(("http://", "https://", "file://"))
