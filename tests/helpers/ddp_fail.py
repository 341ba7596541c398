"""Run by tests/test_distributed.py under torchrun: the trainer, with rank 1 failing at its first
training epoch (after the process group and DDP are up, so rank 0 is left waiting in a collective).
Usage: ddp_fail.py FAILED_AT_FILE TRAINER_FLAGS... Rank 1 writes the time of its failure to
FAILED_AT_FILE (a file of its own: torchrun merges both ranks' output), so the test can bound how
long the run takes to end after it.
"""

import os
import sys
import time
from pathlib import Path

from fastcifar import train

failed_at_file = Path(sys.argv.pop(1))
real_train_epoch = train.train_epoch


def failing_train_epoch(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        failed_at_file.write_text(f"{time.time():.3f}")
        raise RuntimeError("rank 1 fails on purpose")
    return real_train_epoch(*args, **kwargs)


train.train_epoch = failing_train_epoch
train.run_cli(train.main, "fastcifar.train")
