"""Run by tests/test_distributed.py under torchrun: the trainer, with rank 1 failing at its first
training epoch (after the process group and DDP are up, so rank 0 is left waiting in a collective).
Prints the time of the failure, so the test can bound how long the run takes to end after it."""

import os
import time

from fastcifar import train

real_train_epoch = train.train_epoch


def failing_train_epoch(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        print(f"FAILING AT {time.time():.3f}", flush=True)
        raise RuntimeError("rank 1 fails on purpose")
    return real_train_epoch(*args, **kwargs)


train.train_epoch = failing_train_epoch
train.run_cli(train.main, "fastcifar.train")
