"""Mangled YAML only ever yields the loader's own error (or a valid fleet), never another exception."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from primespark.fleet import FleetError, load_text

BASE = (Path(__file__).resolve().parent.parent / "fixtures" / "fleet" / "valid" / "mini-full.yaml").read_text()
YAML_BITS = [":", "-", " ", "\n", "  ", "[", "]", "{", "}", "&a", "*a", "<<:", "!!int", "!!binary", "?", "'", '"',
             "#", "|", ">", "~", "null", "1e9", "0x1f", "2026-01-01", "yes", "...", "---", "%YAML 1.1", "\t"]


def check(text: str) -> None:
    try:
        load_text(text, "fuzz.yaml")
    except FleetError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.file == "fuzz.yaml"
            assert problem.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mangled_fleet_yields_only_fleet_errors(data: st.DataObject) -> None:
    text = BASE
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        bit = data.draw(st.sampled_from(YAML_BITS) | st.text(max_size=6))
        cut = data.draw(st.integers(0, 12))
        if action == "insert":
            text = text[:at] + bit + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + cut:]
        else:
            text = text[:at] + bit + text[at + cut:]
    check(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_yields_only_fleet_errors(text: str) -> None:
    check(text)


def test_alias_bomb_is_refused() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    with pytest.raises(FleetError, match="too large or too deeply nested"):
        load_text(bomb, "bomb.yaml")


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(FleetError, match="too large or too deeply nested"):
        load_text("name: &x [*x]\n", "loop.yaml")
