"""The records of fastcifar.bench_loader's files, isolated and end to end (re-exported by records.py, which the
readers import): the pipelines' entries, and the device op a pipeline kept (a run records it too)."""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from .fields import (
    MAX_SECONDS,
    Count,
    Fraction,
    Interval,
    NonNeg,
    Pipeline,
    Positive,
    Record,
    Recorded,
    Seconds,
    SecondsList,
    _contains,
    close,
)


class DeviceOp(Record):
    """The device op a pipeline kept, and each candidate's time (`<name>_ms`: as many as were timed)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")
    op: str

    @model_validator(mode="after")
    def _times(self) -> DeviceOp:
        for key, value in (self.__pydantic_extra__ or {}).items():
            if key.endswith("_ms") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not 0 < value < MAX_SECONDS):
                raise ValueError(f"{key} must be a time in ms above 0, got {value!r}")
        return self

    def times(self) -> dict[str, float]:
        return {k: v for k, v in (self.__pydantic_extra__ or {}).items() if k.endswith("_ms")}



# ---------------------------------------------------------------------------------------------
# bench_loader: isolated, and end to end


class LoaderEntry(Record):
    images_per_s: Positive
    seconds_per_epoch: Seconds
    images_per_epoch: Count
    epoch_seconds: SecondsList
    headroom: NonNeg | None = None
    device_op: DeviceOp | None = None

    @model_validator(mode="after")
    def _agrees(self) -> LoaderEntry:
        if not close(self.images_per_s, self.images_per_epoch / self.seconds_per_epoch):
            raise ValueError("images_per_s is not images_per_epoch / seconds_per_epoch")
        return self


class ComputeOnly(Record):
    images_per_s: Positive
    images_per_s_ci95: Interval | None = None
    steps: Count
    rounds: Count | None = None
    gflops: Positive | None = None
    utilisation: Fraction | None = None
    utilisation_ci95: Interval | None = None

    @model_validator(mode="after")
    def _inside(self) -> ComputeOnly:
        _contains(self.images_per_s_ci95, self.images_per_s, "images_per_s")
        return self


PIPELINES = typing.get_args(Pipeline)


def _pipelines(data: object, entry: str) -> object:
    """Move a file's pipelines under `pipelines`, keeping their order: every top-level key that names a pipeline,
    and any other object holding `entry` (an unknown pipeline, refused by name there), so that a pipeline whose
    own fields are damaged is refused, never dropped as if it were something else."""
    if not isinstance(data, dict):
        return data
    rest = {k: v for k, v in data.items()
            if k not in PIPELINES and not (isinstance(v, dict) and entry in v and k != "compute_only")}
    return {**rest, "pipelines": {k: v for k, v in data.items() if k not in rest}}


class LoaderFile(Recorded):
    pipelines: dict[Pipeline, LoaderEntry]
    compute_only: ComputeOnly | None = None
    flops_per_image: Positive | None = None

    @model_validator(mode="before")
    @classmethod
    def _collect(cls, data: object) -> object:
        return _pipelines(data, "images_per_s")

    @model_validator(mode="after")
    def _rate(self) -> LoaderFile:
        if self.compute_only is not None and self.compute_only.gflops is not None and (
                self.env.attainable_fp32 is None and self.compute_only.utilisation is not None):
            raise ValueError("compute_only.utilisation without env.attainable_fp32, the rate it divides by")
        return self


class EndToEndEntry(Record):
    seconds: Seconds
    images_per_s: Positive
    train_images: Count
    data_fraction: Fraction
    epoch_seconds: SecondsList
    epochs_timed: Count
    overhead_vs_synthetic: Annotated[float, Field(allow_inf_nan=False, ge=-1, le=100)]
    overhead_vs_synthetic_ci95: Interval | None = None
    ratio_to_memory: Annotated[float, Field(allow_inf_nan=False, gt=0, le=100)] | None = None
    ratio_to_memory_ci95: Interval | None = None
    minor_faults: NonNeg | None = None
    involuntary_switches: NonNeg | None = None

    @model_validator(mode="after")
    def _agrees(self) -> EndToEndEntry:
        if len(self.epoch_seconds) != self.epochs_timed:
            raise ValueError(f"{len(self.epoch_seconds)} epoch_seconds for epochs_timed {self.epochs_timed}")
        _contains(self.overhead_vs_synthetic_ci95, self.overhead_vs_synthetic, "overhead_vs_synthetic")
        _contains(self.ratio_to_memory_ci95, self.ratio_to_memory or 0, "ratio_to_memory") \
            if self.ratio_to_memory is not None else None
        return self


class EndToEndFile(Recorded):
    pipelines: dict[Pipeline, EndToEndEntry] = Field(min_length=1)
    inductor_config: dict[str, Any] | None = None
    # Since whole epochs in a drawn order: each round's order of pipelines, what it was drawn from, the untimed
    # steps before, and --max-steps (None: whole epochs). A file without `order` predates that rule.
    order: list[list[Pipeline]] | None = None
    order_seed: int | None = None
    warm_up_steps: Count | None = None
    max_steps: Count | None = None

    @model_validator(mode="after")
    def _rounds(self) -> EndToEndFile:
        if self.order is not None:
            if any(sorted(r) != sorted(self.pipelines) for r in self.order):
                raise ValueError("a round of `order` is not every pipeline of the file once")
            if any(e.epochs_timed != len(self.order) for e in self.pipelines.values()):
                raise ValueError(f"{len(self.order)} rounds in `order`, but a pipeline timed another count of epochs")
        return self

    def whole_epochs(self) -> bool:
        """Whole epochs (the last partial batch included) in a recorded drawn order: what a verdict rests on."""
        return self.order is not None and self.max_steps is None

    @model_validator(mode="before")
    @classmethod
    def _collect(cls, data: object) -> object:
        return _pipelines(data, "seconds")
