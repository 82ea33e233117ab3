"""The lab image recipe: its hash (the image tag) and what it promises to contain."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from primespark.errors import UserError
from primespark.lab.image import image_tag, read_packages, recipe_hash
from primespark.lab.mirror import read_sources

RECIPE = Path(__file__).resolve().parents[2] / "images" / "lab"


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    copy = tmp_path / "lab"
    shutil.copytree(RECIPE, copy)
    return copy


def test_hash_is_stable_and_ignores_mtimes(recipe):
    before = recipe_hash(recipe)
    os.utime(recipe / "packages.txt", (0, 0))
    assert recipe_hash(recipe) == before == recipe_hash(RECIPE)


def test_hash_changes_with_content_names_and_new_files(recipe):
    base = recipe_hash(recipe)
    (recipe / "packages.txt").write_text((recipe / "packages.txt").read_text() + "htop\n")
    changed = recipe_hash(recipe)
    assert changed != base
    (recipe / "setup.sh").rename(recipe / "setup2.sh")
    renamed = recipe_hash(recipe)
    assert renamed != changed
    (recipe / "extra.conf").write_text("x")
    assert recipe_hash(recipe) != renamed


def test_editor_droppings_do_not_change_the_hash(recipe):
    base = recipe_hash(recipe)
    (recipe / ".setup.sh.swp").write_text("junk")
    assert recipe_hash(recipe) == base


def test_tag_names_the_repository_and_hash(recipe):
    assert image_tag(recipe) == f"primespark-lab:{recipe_hash(recipe)[:16]}"


def test_empty_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="empty"):
        recipe_hash(tmp_path)


def test_recipe_carries_what_roles_and_tests_need():
    packages = set(read_packages(RECIPE))
    needed = {"openssh-server", "python3", "sudo", "iproute2", "iptables", "nftables", "iputils-ping", "procps",
              "wireguard-tools", "wireguard-go", "restic", "rsync", "openssh-sftp-server", "ca-certificates",
              "cron", "tzdata", "chrony", "fail2ban", "unattended-upgrades", "prometheus-node-exporter",
              "python3-apt", "locales", "less"}
    assert needed <= packages
    assert not any(p.startswith("#") for p in packages)


def test_image_ships_no_host_keys_and_names_no_mirror():
    setup = (RECIPE / "setup.sh").read_text()
    assert "rm -f /etc/ssh/ssh_host_*" in setup
    mirror_hosts = {urlparse(uri).hostname for source in read_sources() for uri in source.uris}
    for path in RECIPE.iterdir():
        for host in mirror_hosts - {None}:
            assert host not in path.read_text(), path
        assert "http://" not in path.read_text() and "https://" not in path.read_text(), path
