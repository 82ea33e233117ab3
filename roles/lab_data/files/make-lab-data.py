"""Fill a lab host's backup path with files of mixed sizes, in nested folders; then leave the mark.

Arguments: PATH FILES MAX_BYTES MARK AGED_EVERY AGED_DAYS. Sizes spread evenly on a log scale from 0 to
MAX_BYTES; names and sizes come from a generator seeded with PATH (the same layout every time), the bytes from
os.urandom (restic cannot deduplicate or compress them away). One file in AGED_EVERY (0: none) is dated AGED_DAYS
back, access and modification times, for a tier pass to move. Existing files are left alone.
"""

import os
import random
import sys
import time

path, count, largest, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
aged_every, aged_days = int(sys.argv[5]), float(sys.argv[6])
aged = time.time() - aged_days * 86400
chooser = random.Random(path)
folders = ["docs", "docs/reports", "models/v1", "models/v2", "logs/2025", "media", "config", ""]
for i in range(count):
    folder = os.path.join(path, chooser.choice(folders))
    os.makedirs(folder, exist_ok=True)
    size = 0 if i % 40 == 0 else int(round(largest ** chooser.random()))
    target = os.path.join(folder, f"lab-{i:04d}.{chooser.choice(['bin', 'txt', 'json', 'log', 'db'])}")
    if not os.path.exists(target):
        with open(target, "wb") as out:
            out.write(os.urandom(size))
        if aged_every and i % aged_every == aged_every // 2:
            os.utime(target, (aged, aged))
with open(mark, "w") as done:
    done.write(f"{count} files made in {path}\n")
