"""Run by tests/test_cuda.py: the trainer on a GPU capped to a fraction of its memory, so that running
out of GPU memory can be tested on any card. Usage: small_gpu.py FRACTION TRAINER_FLAGS..."""

import sys

import torch

from fastcifar import train

torch.cuda.set_per_process_memory_fraction(float(sys.argv.pop(1)))
train.run_cli(train.main, "fastcifar.train")
