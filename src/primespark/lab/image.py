"""The lab's base image: Debian built offline with debootstrap from this machine's mirror, then `docker import`ed.

The tag carries a hash of the recipe (images/lab/), so the image is rebuilt only when the recipe changes.
A build happens in a scratch folder and becomes an image in one `docker import`; a killed build leaves
no tag, and the next build starts over (downloaded packages are kept in a cache).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from primespark.errors import UserError
from primespark.lab import mirror

IMAGE_REPOSITORY = "primespark-lab"
Report = Callable[[str], None]


def recipe_files(recipe_dir: Path) -> list[Path]:
    return sorted(p for p in recipe_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def recipe_hash(recipe_dir: Path) -> str:
    """Content hash of every file of the recipe (names and bytes), independent of mtimes."""
    files = recipe_files(recipe_dir)
    if not files:
        raise UserError(f"the lab image recipe {recipe_dir} is empty", fix="restore images/lab/ from git")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(recipe_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def image_tag(recipe_dir: Path) -> str:
    return f"{IMAGE_REPOSITORY}:{recipe_hash(recipe_dir)[:16]}"


def read_packages(recipe_dir: Path) -> list[str]:
    lines = (recipe_dir / "packages.txt").read_text().splitlines()
    return [w for line in lines for w in line.split("#", 1)[0].split()]


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


class ImageBuilder:
    def __init__(self, recipe_dir: Path, work_dir: Path, report: Report = lambda _: None,
                 detail: Report = lambda _: None) -> None:
        self.recipe_dir = recipe_dir
        self.work_dir = work_dir
        self.report = report  # steps
        self.detail = detail  # the latest output line of a step, for a live progress line
        self.tag = image_tag(recipe_dir)
        self.log_path = work_dir / "image-build.log"
        self._lock_fd: int | None = None

    def ensure(self) -> tuple[str, bool]:
        """The image's tag, and whether it had to be built."""
        if image_exists(self.tag):
            return self.tag, False
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.work_dir / "image-build.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.report("waiting for another image build (or what is left of a killed one) to end")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if image_exists(self.tag):
                return self.tag, False
            # Every process of the build inherits the lock: if this one is killed, a debootstrap or dpkg
            # left running keeps the next build waiting instead of writing into a folder being removed.
            self._lock_fd = lock.fileno()
            self._build()
        return self.tag, True

    def _run(self, argv: list[str], step: str, stdin: int | None = None) -> None:
        self.report(step)
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=stdin,
                                       pass_fds=(self._lock_fd,) if self._lock_fd is not None else ())
            assert process.stdout is not None
            for raw in process.stdout:  # the log keeps everything, the progress line shows the latest
                log.write(raw.decode(errors="replace"))
                line = raw.decode(errors="replace").strip()
                if line:
                    self.detail(f"{step}: {line[:70]}")
            returncode = process.wait()
        if returncode != 0:
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-15:])
            raise UserError(
                f"building the lab image failed while {step} (exit {returncode}):\n{tail}",
                fix=f"see the full log {self.log_path}; fix the cause and run `spark lab up` again "
                "(downloaded packages are kept)",
            )

    def _build(self) -> None:
        for tool in ("debootstrap", "unshare", "chroot", "docker", "tar"):
            if shutil.which(tool) is None:
                raise UserError(f"`{tool}` is needed to build the lab image", fix="run `make setup`")
        release = (self.recipe_dir / "release").read_text().strip()
        sources = mirror.read_sources()
        mirror_uri = mirror.debian_mirror(release, sources)
        self.log_path.write_text("")
        scratch_root = self.work_dir / "image-build"
        # Left over from a killed build: nothing can still use it, we hold the build lock.
        shutil.rmtree(scratch_root, ignore_errors=True)
        scratch_root.mkdir(mode=0o700)
        debs = self.work_dir / "image-cache" / "debootstrap"
        archives = self.work_dir / "image-cache" / "apt"
        for d in (debs, archives / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="rootfs.", dir=scratch_root))
        try:
            self._run(["debootstrap", "--variant=minbase", "--include=debian-archive-keyring,ca-certificates",
                       f"--cache-dir={debs}", release, str(root), mirror_uri],
                      f"bootstrapping Debian {release} (debootstrap)")
            keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
            lines = [f"deb [signed-by={keyring}] {line[4:]}"
                     for line in mirror.suite_sources(release, sources)]
            (root / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")
            shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
            # No service starts inside the build.
            (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
            (root / "usr/sbin/policy-rc.d").chmod(0o755)
            packages = " ".join(read_packages(self.recipe_dir))
            # A private mount namespace: the mounts vanish with the process, even when it is killed.
            install = (
                f"mount -t proc proc {root}/proc && mount --bind {archives} {root}/var/cache/apt/archives && "
                f"chroot {root} sh -c 'export DEBIAN_FRONTEND=noninteractive LC_ALL=C; apt-get update -q && "
                f"apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold {packages}'"
            )
            self._run(["unshare", "--mount", "--propagation", "private", "sh", "-c", install],
                      "installing packages")
            shutil.copy(self.recipe_dir / "init.sh", root / "tmp/spark-lab-init")
            shutil.copy(self.recipe_dir / "setup.sh", root / "tmp/spark-lab-setup")
            setup = (f"mount -t proc proc {root}/proc && chroot {root} sh /tmp/spark-lab-setup && "
                     f"rm -f {root}/tmp/spark-lab-setup {root}/tmp/spark-lab-init {root}/usr/sbin/policy-rc.d")
            self._run(["unshare", "--mount", "--propagation", "private", "sh", "-c", setup],
                      "configuring the image")
            (root / "etc/resolv.conf").write_text("")
            (root / "etc/hostname").write_text("")
            self._import(root)
        finally:
            shutil.rmtree(scratch_root, ignore_errors=True)

    def _import(self, root: Path) -> None:
        recipe = recipe_hash(self.recipe_dir)
        tar = subprocess.Popen(["tar", "--numeric-owner", "--one-file-system", "-C", str(root), "-cf", "-", "."],
                               stdout=subprocess.PIPE, pass_fds=(self._lock_fd,) if self._lock_fd else ())
        assert tar.stdout is not None  # stdout=PIPE
        try:
            self._run(["docker", "import",
                       "--change", 'CMD ["/usr/local/sbin/spark-lab-init"]',
                       "--change", "ENV LANG=C.UTF-8",
                       "--change", f"LABEL primespark.lab.recipe={recipe}",
                       "-", self.tag], f"importing into Docker as {self.tag}", stdin=tar.stdout.fileno())
        finally:
            tar.stdout.close()
            if tar.wait() != 0:
                raise UserError("packing the image's root (tar) failed", fix=f"see {self.log_path}")


def prune_old_images(keep: str) -> list[str]:
    """Older builds of the lab image (other recipe hashes); removed when no container uses them."""
    out = subprocess.run(["docker", "image", "ls", IMAGE_REPOSITORY, "--format", "{{.Repository}}:{{.Tag}}"],
                         capture_output=True, text=True).stdout.split()
    removed = []
    for tag in out:
        if tag != keep and subprocess.run(["docker", "rmi", tag], capture_output=True).returncode == 0:
            removed.append(tag)
    return removed


def default_recipe_dir(root: Path) -> Path:
    return root / "images" / "lab"


