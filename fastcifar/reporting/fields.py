"""The field types of the typed records (records.py) and their base class: durations above 0 wherever something
divides by them, finite intervals low end first, counts of at least one, bounded integers; a record that reads
like the dict it came from, for its declared fields present in the file only; and the environment every
results file records (`env`: the machine, the software, the commit)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_SECONDS = 1e7  # ~4 months: a timing beyond it is not a measurement
MAX_INT = 1 << 62

# The pipelines a results file may name: the five loaders and bench_loader's forced variants.
Pipeline = Literal["ffcv", "torch", "memory", "dali", "synthetic", "spdl", "ffcv-inline", "ffcv-parallel",
                   "spdl-per-image"]


# ---------------------------------------------------------------------------------------------
# Field types


def _interval(v: list[float]) -> list[float]:
    if v[0] > v[1]:
        raise ValueError("an interval must give its low end first")
    return v


Finite = Annotated[float, Field(allow_inf_nan=False, ge=-1e18, le=1e18)]
Seconds = Annotated[float, Field(allow_inf_nan=False, gt=0, le=MAX_SECONDS)]  # a duration something divides by
NonNegSeconds = Annotated[float, Field(allow_inf_nan=False, ge=0, le=MAX_SECONDS)]
Positive = Annotated[float, Field(allow_inf_nan=False, gt=0, le=1e18)]
NonNeg = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1e18)]
Fraction = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]
Count = Annotated[int, Field(ge=1, le=MAX_INT)]
Interval = Annotated[list[Finite], Field(min_length=2, max_length=2), AfterValidator(_interval)]
CpuNumber = Annotated[str, Field(pattern=r"^[0-9]{1,5}$")] | Annotated[int, Field(ge=0, le=99999)]
SecondsList = Annotated[list[Seconds], Field(min_length=1)]


def close(a: float, b: float, rel: float = 1e-3) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def _contains(interval: list[float] | None, value: float, what: str) -> None:
    if interval is not None and not interval[0] * (1 - 1e-9) <= value <= interval[1] * (1 + 1e-9):
        raise ValueError(f"{what} {value:g} lies outside its own interval {list(interval)}")


class Record(BaseModel):
    """A typed record that reads like the dict it came from, for its declared fields present in the file."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    def _present(self) -> list[str]:
        extra = list(self.__pydantic_extra__ or {})
        return [k for k in type(self).model_fields if k in self.model_fields_set] + extra

    def __getitem__(self, key: str) -> Any:
        if key not in self._present():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._present()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        return self._present()

    def items(self) -> Iterator[tuple[str, Any]]:
        return ((k, getattr(self, k)) for k in self._present())


# ---------------------------------------------------------------------------------------------
# The machine and the software: env


class MachineRecord(Record):
    cpu_model: str
    cpu_vendor: str | None = None
    cpu_family: CpuNumber | None = None
    cpu_model_number: CpuNumber | None = None
    cpu_flags: dict[str, bool]
    logical_cpus: Count
    usable_cpus: Count | None = None
    logical_cpus_are: str
    memory_gib: Annotated[int, Field(gt=0)] | Positive
    os: str
    kernel: str


class GpuRecord(Record):
    name: str
    memory_gib: Positive | None = None
    driver: str | None = None
    cuda: str | None = None
    cudnn: str | int | None = None
    count: Count | None = None


class Versions(Record):
    python: str
    torch: str
    torch_build: str
    numpy: str
    numba: str
    ffcv: str
    dali: str
    torchvision: str
    spdl: str | None = None
    tensorboard: str
    torch_tb_profiler: str = Field(alias="torch-tb-profiler")

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(key.replace("-", "_"))


class ProbePart(Record):
    gflops: Positive


class Probe(Record):
    gflops: Positive
    kernel: Literal["conv", "matmul"]
    matmul: ProbePart
    conv: ProbePart
    method: str


class EnvProbe(Record):
    """The probe a run recorded of its own (`env.attainable_fp32`); early runs probed the matmul alone."""

    gflops: Positive
    kernel: Literal["conv", "matmul"] | None = None
    matmul: ProbePart | None = None
    conv: ProbePart | None = None
    method: str | None = None


class Env(Record):
    git_commit: str | None = None
    date: str | None = None
    machine: MachineRecord | None = None
    versions: Versions | None = None
    gpu: GpuRecord | None = None
    torch: str | None = None
    device_name: str | None = None
    trainer: list[str] | None = None
    attainable_fp32: EnvProbe | None = None
    environment_variables: dict[str, str] | None = None
    fastcifar: str | None = None
    run_id: str | None = None


class Graphs(Record):
    """The compiled graphs a run recorded (precompile.graphs): static shapes or not, for which batch sizes."""
    dynamic: bool
    batch_sizes: Annotated[list[Count], Field(min_length=1)]
    unique_graphs: Count
    frames_compiled: Annotated[int, Field(ge=0, le=MAX_INT)]
    at_end: Count | None = None


class Recorded(Record):
    env: Env
    graphs: Graphs | None = None
