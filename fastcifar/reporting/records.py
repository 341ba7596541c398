"""Every results file as a typed record (pydantic v2): each field any table, verdict or `make results` reads is
declared here with its type and bounds, and the renderer reads these records only. A table that asked for a
field not declared here would get a KeyError in the docs test, never an unchecked value.

Why pydantic (not msgspec): its errors carry the field's path, which becomes the one line a user sees; strict
mode refuses "5" for 5 and true for 1; model validators state the rules between fields (an interval low end
first, a pooled mean that is the mean of what it pools) next to the fields. The JSON itself is parsed by the
standard library first (`read_json`), which refuses what JSON parsers let through: duplicate keys, 1e999
(infinity), integers too large to format, nesting too deep; and only a regular file of bounded size, inside
the results root, is read.

Records read like the dicts they replace (`r["images_per_s"]`, `r.get("headroom")`, `"x" in r`) but only
for declared fields present in the file: an absent optional field stays absent, as in the file.
"""

from __future__ import annotations

import statistics
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .fields import (  # noqa: F401  (MAX_SECONDS, Record: re-exported)  # noqa: F401  (the env every record carries)
    MAX_INT,
    MAX_SECONDS,
    Count,
    CpuNumber,
    Env,
    Finite,
    Fraction,
    Interval,
    NonNeg,
    NonNegSeconds,
    Pipeline,
    Positive,
    Probe,
    ProbePart,
    Record,
    Recorded,
    Seconds,
    SecondsList,
    _contains,
    close,
)
from .loader_records import (  # noqa: F401  (re-exported: every record is records.X to its readers)
    PIPELINES,
    ComputeOnly,
    DeviceOp,
    EndToEndEntry,
    EndToEndFile,
    LoaderEntry,
    LoaderFile,
)
from .reading import MAX_FILE_BYTES, parse, read_json, read_record  # noqa: F401  (re-exported for the readers)

# ---------------------------------------------------------------------------------------------
# fastcifar.train: a spec run, the cold start


class RunConfig(Record):
    seed: Annotated[int, Field(ge=0, le=MAX_INT)]
    loader: Pipeline
    epochs: Count
    batch_size: Count


class MeanEpoch(Record):
    utilisation: Fraction
    gflops: Positive


class Utilisation(Record):
    mean_epoch: MeanEpoch


class Pieces(Record):
    """Start-up, piece by piece, as bench_startup and every run record them (a piece may predate its name)."""

    python_and_imports_s: NonNegSeconds | None = None
    setup_s: NonNegSeconds | None = None
    compiler_import_s: NonNegSeconds | None = None
    betons_check_s: NonNegSeconds | None = None
    loaders_s: NonNegSeconds | None = None
    model_s: NonNegSeconds | None = None
    compile_s: NonNegSeconds | None = None
    first_batch_s: NonNegSeconds | None = None


class Startup(Pieces):
    """A run's own start-up (`startup` in its JSON)."""

    startup_s: Seconds | None = None
    compile_cache_warm: bool | None = None


class Run(Recorded):
    config: RunConfig
    total_training_time_s: Seconds
    epoch_time_s: Seconds
    epoch_times_s: SecondsList
    inference_time_per_batch_ms: Seconds
    inference_time_per_batch_incl_data_ms: Seconds
    startup_s: Seconds
    warm_up_s: NonNegSeconds | None = None
    val_accuracy: Fraction
    test_accuracy: Fraction
    data_fraction: Fraction
    last_epoch_train_loss: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1e3)]
    utilisation: Utilisation | None = None
    device_op: DeviceOp | None = None
    startup: Startup | None = None

    @model_validator(mode="after")
    def _agrees(self) -> Run:
        if len(self.epoch_times_s) != self.config.epochs:
            raise ValueError(f"{len(self.epoch_times_s)} epoch times in a run of config.epochs "
                             f"{self.config.epochs}")
        if not close(statistics.fmean(self.epoch_times_s), self.epoch_time_s):
            raise ValueError(f"epoch_time_s {self.epoch_time_s:g} is not the mean of epoch_times_s")
        if self.total_training_time_s < sum(self.epoch_times_s) * (1 - 1e-6):
            raise ValueError("total_training_time_s is shorter than its epochs")
        return self


# ---------------------------------------------------------------------------------------------
# bench_startup


PIECES = ["python_and_imports_s", "setup_s", "compiler_import_s", "betons_check_s", "loaders_s", "model_s",
          "compile_s", "first_batch_s", "startup_s"]
# The data pipeline's share of start-up: FFCV's import and the beton check, the train Loader (its numba
# compilation), FFCV's first epoch starting (the first batch read, compiled and made).
DATA_PIPELINE = ("betons_check_s", "loaders_s", "first_batch_s")


class StartupRun(Pieces):
    """One bench_startup run, cold or warm."""

    startup_s: Seconds
    data_pipeline_s: NonNegSeconds | None = None

    @model_validator(mode="after")
    def _whole(self) -> StartupRun:
        if self.data_pipeline_s is None and not all(k in self for k in DATA_PIPELINE):
            raise ValueError(f"neither data_pipeline_s nor its pieces {', '.join(DATA_PIPELINE)}")
        return self


class StartupFile(Recorded):
    cold: StartupRun
    warm: Annotated[list[StartupRun], Field(min_length=1)]

    @model_validator(mode="after")
    def _same_pieces(self) -> StartupFile:
        for i, run in enumerate(self.warm):
            missing = sorted(set(self.cold.keys()) - set(run.keys()))
            if missing:
                raise ValueError(f"warm run {i} lacks {', '.join(missing)}, which the cold run records")
        return self


# ---------------------------------------------------------------------------------------------
# The probe, the step's breakdown and its floor


class ProbeFile(Recorded):
    attainable_fp32: Probe
    probes_gflops: Annotated[list[Positive], Field(min_length=1)] | None = None


class Floor(Record):
    step_ms: Seconds
    step_ms_ci95: Interval | None = None
    images_per_s: Positive
    images_per_s_ci95: Interval | None = None
    gflops: Positive
    rounds: Count
    steps_per_round: Count
    step_ms_per_round: Annotated[list[Seconds], Field(min_length=1)] | None = None
    processes: Annotated[int, Field(ge=2, le=1000)] | None = None
    step_ms_per_process: Annotated[list[Seconds], Field(min_length=2)] | None = None
    images_per_s_pi95: Interval | None = None
    files: list[str] | None = None

    @model_validator(mode="after")
    def _agrees(self) -> Floor:
        pooled = self.processes is not None
        values = self.step_ms_per_process if pooled else self.step_ms_per_round
        if values is None:
            raise ValueError("step_ms_per_process (pooled) or step_ms_per_round (one process) is missing")
        if pooled and (len(values) != self.processes or (self.files is not None and len(self.files) != len(values))):
            raise ValueError(f"processes {self.processes} with {len(values)} values in step_ms_per_process")
        if not pooled and len(values) != self.rounds:
            raise ValueError(f"rounds {self.rounds} with {len(values)} values in step_ms_per_round")
        if not close(statistics.fmean(values), self.step_ms):
            raise ValueError(f"step_ms {self.step_ms:g} is not the mean of the values it pools "
                             f"({statistics.fmean(values):g})")
        _contains(self.step_ms_ci95, self.step_ms, "step_ms")
        _contains(self.images_per_s_ci95, self.images_per_s, "images_per_s")
        _contains(self.images_per_s_pi95, self.images_per_s, "images_per_s")
        return self


class Flops(Record):
    train_step: Positive


class FloorFile(Recorded):
    floor: Floor
    batch: Count
    distinct_batches: Count
    flops: Flops
    inductor_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _rate(self) -> FloorFile:
        if not close(self.floor.images_per_s, self.batch / self.floor.step_ms * 1e3):
            raise ValueError(f"floor.images_per_s is not batch {self.batch} / floor.step_ms")
        return self


class Category(Record):
    ms: NonNegSeconds
    share: Annotated[float, Field(allow_inf_nan=False, ge=0, le=10)]  # of the profiled step (categories overlap it)
    gflops: Positive | None = None
    gbs: Positive | None = None


class Profiled(Record):
    step_ms: Seconds
    sum_ms: Seconds
    categories: dict[str, Category] = Field(min_length=1)

    @model_validator(mode="after")
    def _sums(self) -> Profiled:
        total = sum(c.ms for c in self.categories.values())
        if not close(total, self.sum_ms):
            raise ValueError(f"the categories sum to {total:g} ms, not sum_ms {self.sum_ms:g}")
        for name, c in self.categories.items():
            if not close(c.share, c.ms / self.step_ms, rel=1e-6):
                raise ValueError(f"category {name!r}: share {c.share:g} is not its ms over step_ms")
        return self


class Bandwidth(Record):
    gbs: Positive


class SizeBytes(Record):
    activation_bytes: Count
    forward: NonNeg
    backward: NonNeg


class SizeBandwidth(Record):
    activation_bytes: Count
    gbs: Positive


class ElementwiseBytes(Record):
    forward: Positive
    backward: Positive
    by_size: list[SizeBytes] | None = None  # since the limit takes each activation size at its own bandwidth

    @model_validator(mode="after")
    def _whole(self) -> ElementwiseBytes:
        if self.by_size is not None and not (close(sum(t.forward for t in self.by_size), self.forward)
                                             and close(sum(t.backward for t in self.by_size), self.backward)):
            raise ValueError("elementwise_bytes.by_size does not add up to its forward and backward bytes")
        return self


class Convolution(Record):
    count: Count


class Limit(Record):
    step_ms: Seconds
    convolutions_ms: Seconds
    elementwise_ms: Seconds
    optimizer_ms: Seconds
    efficiency: Positive
    bandwidth: Bandwidth
    bandwidth_by_size: list[SizeBandwidth] | None = None
    elementwise_bytes: ElementwiseBytes
    convolutions: Annotated[list[Convolution], Field(min_length=1)]

    @model_validator(mode="after")
    def _sums(self) -> Limit:
        if not close(self.step_ms, self.convolutions_ms + self.elementwise_ms + self.optimizer_ms):
            raise ValueError("limit.step_ms is not the sum of its parts")
        by_size = self.elementwise_bytes.by_size
        if self.bandwidth_by_size is not None and by_size is not None:
            gbs = {b.activation_bytes: b.gbs for b in self.bandwidth_by_size}
            if set(gbs) != {t.activation_bytes for t in by_size}:
                raise ValueError("bandwidth_by_size does not measure every activation size of elementwise_bytes")
            if not close(self.elementwise_ms, sum(1e3 * (t.forward + t.backward) / (gbs[t.activation_bytes] * 1e9)
                                                  for t in by_size)):
                raise ValueError("limit.elementwise_ms is not each activation size's bytes at its bandwidth")
        return self


class ConvInStep(Record):
    input: list[Count]
    out_channels: Count
    kernel: list[Count]
    stride: list[Count]
    count: Count
    step_forward_ms: Seconds
    step_backward_ms: Seconds
    alone_forward_ms: Seconds
    alone_backward_ms: Seconds


class ConvsInStep(Record):
    shapes: list[ConvInStep]
    layout_copies_in_backward_ms: NonNegSeconds


class BreakdownFile(FloorFile):
    profiled: Profiled
    limit: Limit
    attainable_fp32: ProbePart
    kernel_profile_build_step_ms: Seconds
    convolutions_in_step: ConvsInStep | None = None  # since each convolution's time in the step was read

    @model_validator(mode="after")
    def _ratio(self) -> BreakdownFile:
        if not close(self.limit.efficiency, self.limit.step_ms / self.floor.step_ms, rel=1e-2):
            raise ValueError("limit.efficiency is not limit.step_ms / floor.step_ms")
        return self


# ---------------------------------------------------------------------------------------------
# A column's own files: machine.json, measure.json, the spec's summary.json


class MachineNote(Record):
    """machine.json: the hand-kept description of a machine whose JSONs predate `env.machine` (or some of them)."""

    cpu_model: str
    isa: Literal["amx", "avx512", "avx2", "sve", "neon", "sse"]
    logical_cpus: Count
    cpu_vendor: str | None = None
    cpu_family: CpuNumber | None = None
    cpu_model_number: CpuNumber | None = None
    memory_gib: Annotated[int, Field(gt=0)] | Positive | None = None
    note: str | None = None
    date: str | None = None
    commits: list[Annotated[str, Field(pattern=r"^[0-9a-f]{7,40}$")]] | None = None
    attributes: list[str] | None = None


class Stage(Record):
    rc: int | Literal["kept", "skipped", "interrupted"] | None = None
    seconds: NonNegSeconds | None = None


class MeasureFile(Record):
    commit: str | None = None
    fastcifar: str | None = None
    run_id: str | None = None
    stages: dict[str, Stage]


class SpecGroup(Record):
    seeds: list[Annotated[int, Field(ge=0, le=MAX_INT)]]


class SpecSummary(Record):
    loaders: dict[Pipeline, SpecGroup]


class Precompile(Record):
    jit: Seconds
    load: Seconds


class PrecompileFile(Recorded):
    """startup/try_precompile.json: a trial's medians, each mode's fresh process to its first step."""

    warm_median_total_s: Precompile


class SetupFile(Recorded):
    """setup.json (benchmarks.bench_setup): `make setup` timed from a fresh clone, and what it installed."""

    seconds: Seconds
    venv_bytes: Count
    torch_build: str
    packages: Count
    apt_packages_present_before: dict[str, bool]
