"""Run by tests/test_distributed.py, alone or under torchrun: one optimizer step of the trainer's loop
(`train.train_epoch`, `distributed.wrap`, the `memory` pipeline's sharding) with the augmentation
off and BatchNorm on its running statistics, then rank 0 saves the parameters.

Why BatchNorm is held in eval mode: with plain DDP each rank normalises over its own 64 images, not
the global 128 — by design, as in every DDP trainer (SyncBatchNorm would pool them, on GPUs only).
With batch statistics out of the way, one process and two must take the same step: DDP averages
the two ranks' gradients into the gradient of the global batch.
Usage: ddp_first_step.py DATA_DIR OUT.pt
"""

import sys

import torch
from torch import nn

from fastcifar import distributed
from fastcifar.augment import Normalize
from fastcifar.data import make_loaders
from fastcifar.model import resnetv2_20
from fastcifar.profiling import StepTimer
from fastcifar.train import train_epoch

data_dir, out = sys.argv[1], sys.argv[2]
ranks, device = distributed.setup("cpu")
loaders = make_loaders(data_dir, device, 128 // ranks.world_size, 1, seed=0, loader="memory", rank=ranks.rank,
                       world_size=ranks.world_size)
train = loaders["train"]
train.augment = Normalize(device)  # augmentation off: the same pixels whatever the rank
torch.manual_seed(0)
model = resnetv2_20().to(memory_format=torch.channels_last)
for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
        module.train = lambda mode=True, m=module: nn.Module.train(m, False)  # stays on running statistics
net = distributed.wrap(model, device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4)
stats = train_epoch(net, train, optimizer, device, StepTimer(device), max_steps=1)
assert stats["train_images"] == 128, stats
if ranks.main:
    torch.save({name: p.detach() for name, p in model.named_parameters()}, out)
del net, optimizer  # the DDP wrapper first: cleanup() destroys the process group once nothing holds it
distributed.cleanup()
