"""The watcher of a continuous sync job's source folder. Runs on the source host (`python3 -c`, standard library
only: inotify through ctypes, no package to install) and prints one JSON object per line:

- `{"e": "ready", "watches": N}` once every folder of the tree is watched;
- `{"e": "changed", "paths": [...], "t": T}`: files written and closed, moved in, or whose attributes changed
  (paths relative to the root; a folder moved in lists its files);
- `{"e": "deleted", "paths": [...], "t": T}`: files or folders deleted or moved away;
- `{"e": "rescan", "why": ...}`: inotify lost events (queue overflow) or ran out of watches: only a full pass
  can tell what changed;
- `{"e": "gone", "why": ...}`: the root itself was deleted, moved or unmounted (exits 3);
- `{"e": "alive", "t": T}` every few seconds, so that a dead host is noticed and a dead reader ends us.

It exits when its stdin closes (the controller went away). Files being written are reported when closed, not
when created; rsync's own temporary files and `.~tmp~` folders (a transfer into this folder) are not reported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import select
import struct
import sys
import time

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
MASK = (IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
        | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
HEADER = struct.Struct("iIII")
ALIVE_SECONDS = 5.0
# rsync's --delay-updates folder and temporary files; tier migration's staging folder (data/tierside.STAGING: its
# copies are sent once placed, and no job sends the folder)
IGNORED_NAME = re.compile(r"^(\.~tmp~|\.spark-tier-incoming|\..+\.[A-Za-z0-9]{6})$")


def emit(event: dict[str, object]) -> None:
    try:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader is gone
        os._exit(0)


class Tree:
    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.rm_watch = libc.inotify_rm_watch
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}  # watch descriptor -> folder relative to the root ("" is the root)
        self.out_of_watches = False

    def absolute(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def watch(self, rel: str) -> bool:
        wd = self.add_watch(self.fd, os.fsencode(self.absolute(rel)), MASK)
        if wd < 0:
            code = ctypes.get_errno()
            if code == errno.ENOSPC and not self.out_of_watches:
                self.out_of_watches = True
                emit({"e": "rescan", "why": "out of inotify watches (fs.inotify.max_user_watches)"})
            return False
        self.paths[wd] = rel
        return True

    def add_tree(self, rel: str) -> list[str]:
        """Watch `rel` and every folder below it; the files found there. Each folder is watched before it is
        listed: a file that lands in between is then listed, or its events arrive (listing first would miss a
        file written and closed before the watch was set, as in a folder made and filled at once)."""
        files: list[str] = []
        folders = [rel]
        while folders:
            here = folders.pop()
            self.watch(here)
            try:
                entries = list(os.scandir(self.absolute(here)))
            except OSError:  # gone already: its deletion is reported by its parent's watch
                continue
            for entry in entries:
                if IGNORED_NAME.match(entry.name):
                    continue
                path = os.path.join(here, entry.name) if here else entry.name
                (folders if entry.is_dir(follow_symlinks=False) else files).append(path)
        return files

    def forget(self, prefix: str) -> None:
        for wd, rel in list(self.paths.items()):
            if rel == prefix or rel.startswith(prefix + "/"):
                self.rm_watch(self.fd, wd)
                del self.paths[wd]

    def rename(self, old: str, new: str) -> None:
        for wd, rel in list(self.paths.items()):
            if rel == old or rel.startswith(old + "/"):
                self.paths[wd] = new + rel[len(old):]

    def events(self) -> list[tuple[int, int, int, str]]:
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return []
        out, offset = [], 0
        while offset + HEADER.size <= len(data):
            wd, mask, cookie, length = HEADER.unpack_from(data, offset)
            offset += HEADER.size
            name = os.fsdecode(data[offset:offset + length].rstrip(b"\0"))
            offset += length
            out.append((wd, mask, cookie, name))
        return out


def _folder_event(tree: Tree, mask: int, cookie: int, rel: str, moved: dict[int, str], changed: list[str],
                  deleted: list[str]) -> None:
    if mask & IN_MOVED_FROM:
        moved[cookie] = rel
    elif mask & IN_MOVED_TO and cookie in moved:  # renamed inside the tree: its watches keep their descriptors
        old = moved.pop(cookie)
        tree.rename(old, rel)
        deleted.append(old)
        changed += tree.add_tree(rel)
    elif mask & (IN_CREATE | IN_MOVED_TO):
        changed += tree.add_tree(rel)  # files may be in it before its watch was set
    elif mask & IN_DELETE:
        deleted.append(rel)


def handle(tree: Tree, batch: list[tuple[int, int, int, str]]) -> tuple[list[str], list[str], str]:
    """(changed, deleted, why the root is gone) of one read's events."""
    changed: list[str] = []
    deleted: list[str] = []
    moved: dict[int, str] = {}  # folders moved away, by cookie, until their arrival (if in the tree)
    gone = ""
    for wd, mask, cookie, name in batch:
        folder = tree.paths.get(wd)
        if mask & IN_Q_OVERFLOW:
            emit({"e": "rescan", "why": "inotify queue overflow"})
        elif folder == "" and mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED):
            gone = "unmounted" if mask & IN_UNMOUNT else "deleted or moved away"
        elif mask & IN_IGNORED:
            tree.paths.pop(wd, None)
        elif folder is None or not name or IGNORED_NAME.match(name):
            continue
        elif mask & IN_ISDIR:
            _folder_event(tree, mask, cookie, os.path.join(folder, name) if folder else name, moved, changed,
                          deleted)
        else:
            rel = os.path.join(folder, name) if folder else name
            if mask & (IN_CLOSE_WRITE | IN_MOVED_TO | IN_ATTRIB):
                changed.append(rel)
            elif mask & IN_CREATE and os.path.islink(tree.absolute(rel)):
                changed.append(rel)  # a symlink is never written and closed
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                deleted.append(rel)
    for old in moved.values():  # moved out of the tree
        tree.forget(old)
        deleted.append(old)
    return changed, deleted, gone


def main(root: str) -> int:
    if not os.path.isdir(root):
        emit({"e": "gone", "why": "missing"})
        return 3
    tree = Tree(root)
    tree.add_tree("")
    emit({"e": "ready", "watches": len(tree.paths)})
    last = time.monotonic()
    while True:
        readable, _, _ = select.select([tree.fd, sys.stdin.fileno()], [], [], ALIVE_SECONDS)
        if sys.stdin.fileno() in readable and not os.read(sys.stdin.fileno(), 4096):
            return 0  # stdin closed: the controller is gone
        if tree.fd in readable:
            changed, deleted, gone = handle(tree, tree.events())
            now = time.time()
            if deleted:
                emit({"e": "deleted", "paths": sorted(set(deleted)), "t": now})
            if changed:
                emit({"e": "changed", "paths": sorted(set(changed)), "t": now})
            if gone:
                emit({"e": "gone", "why": gone})
                return 3
        if time.monotonic() - last >= ALIVE_SECONDS:
            emit({"e": "alive", "t": time.time()})
            last = time.monotonic()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
