"""What a training run shows and logs: rows of ``log.csv``, their truncation at a resume, the progress bar.

Shared by the diffusion trainer (:mod:`fastgen.train.loop`) and the zoo runner
(:mod:`fastgen.zoo.train`). ``log.csv`` has a header row (``step`` first) and one row per
logging window; a resumed run first drops the rows after its checkpoint's step, so the file
reads as if the run had never stopped.
"""

from __future__ import annotations

import csv
import os
import sys


def append_row(path: str, header: list, row: list) -> None:
    """Append ``row`` to the CSV file ``path``, writing ``header`` first when the file is new."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(header)
        w.writerow(row)


def truncate_rows(path: str, step: int) -> None:
    """Drop the rows of the CSV file ``path`` whose first column (the step) is above ``step``."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) <= step])


class _NoBar:
    """Stands in for tqdm where it is not installed: the run goes on without a progress bar."""

    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def progress_bar(total: int, initial: int, disable: bool):
    """A tqdm bar with it/s and ETA on stderr; without tqdm (pip install tqdm), none (with a note)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not disable:
            print("fastgen train: tqdm is not installed; no progress bar (pip install tqdm)", file=sys.stderr)
        return _NoBar()
    return tqdm(total=total, initial=initial, disable=disable, desc="train", dynamic_ncols=True)
