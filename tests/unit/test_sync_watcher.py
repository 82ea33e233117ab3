"""The continuous sync's watcher (data/watchside.py) on this machine's inotify: what it reports of a folder made and
filled at once, the race a lab test met (a Pi's writer made its folder and wrote the first file before the watch on
the new folder was set: that file never reached the NAS)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from primespark.data import watchside


def _tree_writing_before_each_watch(root: Path, writes: dict[str, str]) -> watchside.Tree:
    """A tree whose watch on a folder named in `writes` is set only after a file was written and closed in it:
    the moment between a new folder's creation and its watch, made to happen every time."""
    tree = watchside.Tree(str(root))
    real_add_watch = tree.add_watch

    def add_watch_after_a_write(fd: int, path: bytes, mask: int) -> int:
        folder = Path(os.fsdecode(path))
        if folder.name in writes:
            (folder / writes[folder.name]).write_bytes(b"written and closed before the watch")
        return int(real_add_watch(fd, path, mask))

    tree.add_watch = add_watch_after_a_write  # type: ignore[method-assign]
    return tree


def test_a_file_written_before_its_new_folders_watch_is_set_is_reported(tmp_path: Path) -> None:
    tree = _tree_writing_before_each_watch(tmp_path, {"new": "first.bin", "deeper": "second.bin"})
    tree.add_tree("")
    (tmp_path / "new" / "deeper").mkdir(parents=True)

    changed, deleted, gone = watchside.handle(tree, tree.events())

    assert sorted(changed) == ["new/deeper/second.bin", "new/first.bin"]
    assert not deleted and not gone
    assert sorted(tree.paths.values()) == ["", "new", "new/deeper"]


def test_a_file_written_after_the_new_folder_was_listed_arrives_as_its_own_event(tmp_path: Path) -> None:
    tree = watchside.Tree(str(tmp_path))
    tree.add_tree("")
    (tmp_path / "new").mkdir()
    assert watchside.handle(tree, tree.events())[0] == []

    (tmp_path / "new" / "later.bin").write_bytes(b"after the listing")

    assert watchside.handle(tree, tree.events())[0] == ["new/later.bin"]


def test_the_first_listing_reports_files_and_symlinks_and_skips_rsync_temporaries(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "reading.json").write_text("{}")
    (tmp_path / "a" / ".reading.json.Ab12Cd").write_text("rsync's temporary")
    (tmp_path / "a" / ".~tmp~").mkdir()
    (tmp_path / "a" / ".~tmp~" / "partial.bin").write_text("partial")
    (tmp_path / "link").symlink_to(tmp_path / "a")

    files = watchside.Tree(str(tmp_path)).add_tree("")

    assert sorted(files) == ["a/b/reading.json", "link"]


def test_a_watched_link_makes_a_full_pass_every_rescan_interval_and_none_between(tmp_path: Path) -> None:
    from primespark.data.layout import Link
    from primespark.data.watch import LinkWatch
    from primespark.fleet.model import SyncMode

    link = Link("hot-to-nas", "pi-1", "/srv/hot", "nas-1", "/srv/warm/pi-1", SyncMode.copy)
    watch = LinkWatch(None, link, threading.Event())  # type: ignore[arg-type]  # no watcher is started here
    watch.ready.set()
    # a whole number of seconds: (start + 600) - start is then exactly 600, as it may not be for a fraction
    start = float(int(time.monotonic()))

    first = watch.due(start, 1.0, 5.0, rescan_seconds=600)
    assert first is not None and first.full and "watcher starts" in first.why
    assert watch.due(start + 599, 1.0, 5.0, rescan_seconds=600) is None  # a quiet source: no pass

    periodic = watch.due(start + 600, 1.0, 5.0, rescan_seconds=600)
    assert periodic is not None and periodic.full and "no full pass for 600 s" in periodic.why
    assert watch.due(start + 1199, 1.0, 5.0, rescan_seconds=600) is None
