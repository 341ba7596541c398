"""Every torch.compile compilation of a run happens here: on the main thread, while no FFCV thread runs.

Why: FFCV runs every pipeline stage, our device op included, in its own EpochIterator thread on side
CUDA streams. Dynamo and Inductor are not thread-safe (pytorch#105943, #118260) and CUDA-graph trees
fail outside the thread that set them up (#123177). So the run first calls the compiled model (train
graph with its backward) and the compiled device op once for every batch size its loaders will
yield — the full batch and each split's last partial batch — on dummy inputs, then `frozen()` sets
the compiler's stance to "eager_on_recompile": from then on nothing compiles in any thread, and an
input the warm-up did not foresee runs eagerly (correct, slower) instead of compiling inside FFCV's
thread. The eval graph (under no_grad) is compiled the same way after the first training epoch,
before the first evaluation (`warm_up_evaluation`), so the first training step does not wait for it.
The model's state is restored afterwards, and no random generator is touched, so the run trains
exactly as it would have without the warm-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .distributed import unwrap

# After the warm-up: use compiled code where it exists, never compile. Tests swap in
# "fail_on_recompile" to prove the warm-up covers every input of a run.
STANCE_AFTER_WARM_UP = "eager_on_recompile"


def batch_sizes(images: int, batch_size: int, max_steps: int | None = None) -> list[int]:
    """The distinct batch sizes a loader of `images` yields (drop_last=False), given a step cap."""
    full, last = divmod(images, batch_size)
    sizes = [batch_size] if full else []
    if last and (max_steps is None or max_steps > full):
        sizes.append(last)
    return sizes


def import_compiler() -> None:
    """Import what torch.compile needs (dynamo, inductor: ~4 s on a 2-core AMD EPYC) without compiling
    anything. Its first call imports them wherever that is — in the train loader's device op — and
    start-up would count them as the data pipeline's."""
    torch.compile(nn.Identity())


def compile_model(model: nn.Module, mode: str | None = "default", in_place: bool = False) -> nn.Module:
    """torch.compile with static shapes: one graph per batch size (the full batch and each split's last
    partial one, all compiled by the warm-up). Dynamo's default recompiles at the second size with a
    symbolic batch, and the full batches after it run that dynamic graph, which the floor and the
    end-to-end benchmark (one size) never compile: every command compiles this way, so training, its
    floor and the benchmarks run the same graphs (`graphs` records them)."""
    if in_place:
        model.compile(mode=mode, dynamic=False)
        return model
    return torch.compile(model, mode=mode, dynamic=False)


def graphs(batch_sizes: Iterable[int]) -> dict:
    """The graphs compiled so far in this process (Dynamo's counters), with static shapes for these batch
    sizes: every run's JSON records it, and a column checks that training and its floor agree."""
    from torch._dynamo.utils import counters

    return {"dynamic": False, "batch_sizes": sorted(set(batch_sizes), reverse=True),
            "unique_graphs": int(counters["stats"]["unique_graphs"]), "frames_compiled": int(counters["frames"]["ok"])}


def mark_step(mode: str | None) -> None:
    """Under reduce-overhead (CUDA graphs) a new step may overwrite the last step's outputs: tell the
    graph trees where each step begins, so nothing reads a static buffer after its next replay."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def warm_up_model(net: nn.Module, model: nn.Module, device: torch.device, train_sizes: Iterable[int],
                  eval_sizes: Iterable[int], mode: str | None = None) -> None:
    """Compile `net` (the compiled `model`) for each train and eval batch size, then restore `model`.

    Train: forward and backward (AOTAutograd compiles the backward on its first call). Eval: eval
    mode under no_grad, as `train.evaluate` calls it. Under reduce-overhead each size runs twice, so
    the CUDA graphs are recorded here too. BatchNorm's running statistics are put back and the
    gradients cleared; the optimizer is never touched.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    repeats = 2 if mode == "reduce-overhead" else 1

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)

    net.train()
    for n in train_sizes:
        for _ in range(repeats):
            mark_step(mode)
            loss = nn.functional.cross_entropy(net(zeros(n)), torch.zeros(n, dtype=torch.int64, device=device))
            loss.backward()
    scorer = unwrap(net)  # as train.py scores: without DDP
    scorer.eval()
    with torch.no_grad():
        for n in eval_sizes:
            for _ in range(repeats):
                mark_step(mode)
                scorer(zeros(n))
        model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)
    net.train()


def warm_up_run(net: nn.Module, model: nn.Module, loaders: dict, device: torch.device, batch_size: int,
                max_steps: int | None, mode: str | None, compiled: bool | None = None,
                evaluation: bool = True) -> dict:
    """Compile everything a training run calls: the device op of each loader that has a compiled one
    (`loader.augment.warm_up`) and the model, for the batch sizes each split yields. Returns the sizes.
    `compiled`: whether `net` is compiled (default: whether it is another object than `model`; under
    torchrun it is DDP, compiled or not). evaluation=False leaves the eval graphs to
    `warm_up_evaluation`, which the trainer calls after the first epoch (off the start-up path)."""
    sizes = {split: batch_sizes(loader.images, batch_size, max_steps) for split, loader in loaders.items()}
    for split, loader in loaders.items():
        augment = getattr(loader, "augment", None)
        if getattr(augment, "compiled", False):
            augment.warm_up(sizes[split])
    if (net is not model) if compiled is None else compiled:
        warm_up_model(net, model, device, sizes["train"], eval_sizes(sizes) if evaluation else [], mode)
    return sizes


def eval_sizes(sizes: dict) -> list[int]:
    """The batch sizes the eval graph sees (val's and test's), largest first."""
    return sorted({n for split in ("val", "test") for n in sizes.get(split, [])}, reverse=True)


def warm_up_evaluation(net: nn.Module, model: nn.Module, device: torch.device, sizes: dict,
                       mode: str | None) -> list[int]:
    """Compile the eval graph for val's and test's batch sizes, inside `frozen()`, between the first
    training epoch and the first evaluation. Returns the sizes compiled.

    Why then: the first training step does not need the eval graph, and start-up counts to it (a
    third of the warm-up's graphs). Why it is safe: it runs on the main thread with no FFCV thread
    alive — the train epoch's thread has been joined when `train_epoch` returns, and val's Loader is
    built at its first iteration, after this — so it is the same situation as before the first batch.
    The stance is lifted for this call only; it is process-wide, and nothing else runs meanwhile."""
    wanted = eval_sizes(sizes)
    with torch.compiler.set_stance("default"):
        warm_up_model(net, model, device, [], wanted, mode)
    return wanted


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """No compilation inside the block, in any thread: the compiler's stance is process-wide."""
    with torch.compiler.set_stance(STANCE_AFTER_WARM_UP):
        yield
