"""How a streamed command's output is read: every line, in order, whole, in few reads when it prints many."""

from __future__ import annotations

import subprocess
import sys

from primespark.hosts import LocalRunner, stream
from primespark.hosts.runner import _paced_lines

# one line at a time, each its own write, a line every 0.1 ms: a reader that kept up would read them one by one
WRITER = r"""
import os, sys, time
count = int(sys.argv[1])
for i in range(count):
    until = time.perf_counter() + 0.0001
    while time.perf_counter() < until:
        pass
    os.write(1, f"line {i} ".encode() + b"x" * (i % 50) + b"\n")
os.write(1, b"last, without a newline")
"""


def test_many_short_lines_come_whole_and_in_order_in_far_fewer_reads_than_lines() -> None:
    count = 3000
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(count)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    chunks: list[bytes] = []
    reads_with_lines = 0
    lines: list[bytes] = []
    for complete in _paced_lines(proc.stdout.fileno(), chunks):
        reads_with_lines += 1
        lines += complete
    proc.wait()
    expected = [f"line {i} ".encode() + b"x" * (i % 50) for i in range(count)] + [b"last, without a newline"]
    assert lines == expected
    assert b"".join(chunks) == b"\n".join(expected)
    assert reads_with_lines < count / 10, f"{reads_with_lines} reads for {count} lines"


def test_a_streamed_command_gives_each_line_to_the_caller_and_its_whole_output_at_the_end() -> None:
    seen: list[str] = []
    done = stream(LocalRunner(), [sys.executable, "-c", WRITER, "500"], on_line=seen.append, timeout=60)
    assert done.returncode == 0
    assert seen == [f"line {i} " + "x" * (i % 50) for i in range(500)] + ["last, without a newline"]
    assert done.text == "\n".join(seen)


def test_a_line_longer_than_a_read_comes_whole_and_an_empty_line_stays() -> None:
    script = "import os; os.write(1, b'a' * 3_000_000); os.write(1, b'\\n\\nb\\n')"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    lines = [line for complete in _paced_lines(proc.stdout.fileno(), []) for line in complete]
    proc.wait()
    assert lines == [b"a" * 3_000_000, b"", b"b"]
