"""What the results JSONs hold, as the renderer reads them: names shared with the commands that write them."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..utils import UserError

# The start-up pieces `bench_startup` records per run, in the order a run passes through them.
PIECES = ["python_and_imports_s", "setup_s", "compiler_import_s", "betons_check_s", "loaders_s", "model_s",
          "compile_s", "first_batch_s", "startup_s"]

# The data pipeline's share of start-up: FFCV's import and the beton check, the train Loader (its numba
# compilation), FFCV's first epoch starting (the first batch read, compiled and made).
DATA_PIPELINE = ("betons_check_s", "loaders_s", "first_batch_s")

# ---------------------------------------------------------------------------------------------
# Reading a results JSON: every file the renderer or `make results` reads passes through `read_json`
# and, where it is a result, one of the checks below. A bad file is refused with one line naming the
# file and the field (`UserError`, exit 2), never dropped as if it were absent, never rendered.


MAX_SECONDS = 1e7  # ~4 months: a timing beyond it is not a measurement


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: Path) -> object | None:
    """The parsed file; None only when it does not exist ("not measured"). Unreadable, not UTF-8, not
    JSON, NaN/Infinity, nested too deeply, null: refused."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise UserError(f"{path}: nested too deeply") from None
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
    if data is None:  # null is no results file, and None must keep meaning "absent"
        raise UserError(f"{path}: must be a JSON object, got null")
    return data


class Fields:
    """Checks on one parsed file, each naming the file and the dotted field it refuses."""

    def __init__(self, path: Path, data: object):
        self.path, self.data = path, data
        if not isinstance(data, dict):
            self.refuse("", f"a JSON object, got {type(data).__name__}")

    def refuse(self, field: str, expected: str):
        where = f" field {field!r}" if field else ""
        raise UserError(f"{self.path}:{where} must be {expected}")

    def get(self, field: str, optional: bool = False) -> object:
        value: object = self.data
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                if optional:
                    return None
                self.refuse(field, "present")
            value = value[part]
        return value

    def number(self, field: str, lo: float = -math.inf, hi: float = math.inf, optional: bool = False,
               integer: bool = False) -> float | None:
        value = self.get(field, optional)
        if value is None and optional:
            return None
        kind = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not lo <= value <= hi:
            self.refuse(field, f"{'an integer' if integer else 'a number'} in [{lo:g}, {hi:g}], got {value!r}")
        return value

    def seconds(self, field: str, optional: bool = False) -> float | None:
        return self.number(field, 0.0, MAX_SECONDS, optional)

    def positive(self, field: str, optional: bool = False) -> float | None:
        value = self.number(field, 0.0, math.inf, optional)
        if value == 0:
            self.refuse(field, "above 0")
        return value

    def fraction(self, field: str, optional: bool = False) -> float | None:
        return self.number(field, 0.0, 1.0, optional)

    def text(self, field: str, optional: bool = False) -> str | None:
        value = self.get(field, optional)
        if value is not None and not isinstance(value, str):
            self.refuse(field, f"text, got {value!r}")
        return value

    def mapping(self, field: str, optional: bool = False) -> dict | None:
        value = self.get(field, optional)
        if value is not None and not isinstance(value, dict):
            self.refuse(field, f"an object, got {type(value).__name__}")
        return value

    def numbers(self, field: str, lo: float = 0.0, hi: float = MAX_SECONDS, size: int | None = None,
                optional: bool = False) -> list[float] | None:
        value = self.get(field, optional)
        if value is None and optional:
            return None
        ok = isinstance(value, list) and len(value) >= 1 and (size is None or len(value) == size) and all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi
            for v in value)
        if not ok:
            self.refuse(field, f"a list of {size or 'one or more'} numbers in [{lo:g}, {hi:g}]")
        return value

    def interval(self, field: str) -> None:
        """An optional 95 % interval: null, or two finite numbers, low first."""
        value = self.get(field, optional=True)
        if value is not None:
            lo, hi = self.numbers(field, -math.inf, math.inf, size=2)
            if lo > hi:
                self.refuse(field, "an interval, low end first")

    def env(self) -> None:
        self.mapping("env")
        self.text("env.git_commit", optional=True)
        self.text("env.date", optional=True)
        self.mapping("env.machine", optional=True)
        if self.get("env.machine", optional=True) is not None:
            self.text("env.machine.cpu_model")
            self.mapping("env.machine.cpu_flags")
            self.number("env.machine.usable_cpus", 1, 1 << 20, integer=True)


SPEC_METRICS = ("total_training_time_s", "epoch_time_s", "inference_time_per_batch_ms",
                "inference_time_per_batch_incl_data_ms", "startup_s")


def check_run(path: Path, data: object) -> dict:
    """One `fastcifar.train` run JSON (a spec seed, the cold start)."""
    f = Fields(path, data)
    f.env()
    f.number("config.seed", 0, 2**63, integer=True)
    f.text("config.loader")
    for key in SPEC_METRICS:
        f.seconds(key)
    for key in ("val_accuracy", "test_accuracy", "data_fraction"):
        f.fraction(key)
    f.number("last_epoch_train_loss", 0.0, 1e3)
    f.seconds("warm_up_s", optional=True)
    f.numbers("epoch_times_s")
    if f.get("utilisation", optional=True) is not None:
        f.fraction("utilisation.mean_epoch.utilisation")
        f.positive("utilisation.mean_epoch.gflops")
    if f.get("device_op", optional=True) is not None:
        f.text("device_op.op")
    warm = f.get("startup.compile_cache_warm", optional=True)
    if warm is not None and not isinstance(warm, bool):
        f.refuse("startup.compile_cache_warm", f"true, false or null, got {warm!r}")
    return data


def check_loader(path: Path, data: object) -> dict:
    """`bench_loader` isolated: each pipeline's images/s and epochs; the compute-only floor."""
    f = Fields(path, data)
    f.env()
    for name, entry in data.items():
        if isinstance(entry, dict) and "images_per_s" in entry and name != "compute_only":
            f.positive(f"{name}.images_per_s")
            f.positive(f"{name}.seconds_per_epoch")
            f.positive(f"{name}.images_per_epoch")
            f.numbers(f"{name}.epoch_seconds")
            f.number(f"{name}.headroom", 0.0, math.inf, optional=True)
    if f.get("compute_only", optional=True) is not None:
        f.positive("compute_only.images_per_s")
        f.number("compute_only.steps", 1, 1 << 40, integer=True)
        f.interval("compute_only.images_per_s_ci95")
        if f.get("compute_only.utilisation", optional=True) is not None:
            f.fraction("compute_only.utilisation")
            f.positive("compute_only.gflops")
            f.interval("compute_only.utilisation_ci95")
            f.positive("env.attainable_fp32.gflops")
    return data


def check_end_to_end(path: Path, data: object) -> dict:
    """`bench_loader --end-to-end`: each pipeline's training epochs, paired by round with `synthetic`."""
    f = Fields(path, data)
    f.env()
    rows = [name for name, entry in data.items() if isinstance(entry, dict) and "seconds" in entry]
    if not rows:
        f.refuse("", "at least one pipeline's epochs")
    for name in rows:
        f.positive(f"{name}.seconds")
        f.positive(f"{name}.images_per_s")
        f.number(f"{name}.train_images", 1, 1 << 40, integer=True)
        f.fraction(f"{name}.data_fraction")
        f.numbers(f"{name}.epoch_seconds")
        f.number(f"{name}.epochs_timed", 1, 1 << 20, integer=True)
        f.number(f"{name}.overhead_vs_synthetic", -1.0, 100.0)
        f.interval(f"{name}.overhead_vs_synthetic_ci95")
        f.number(f"{name}.ratio_to_memory", 0.0, 100.0, optional=True)
        f.interval(f"{name}.ratio_to_memory_ci95")
        for count in ("minor_faults", "involuntary_switches"):
            f.number(f"{name}.{count}", 0, 1 << 50, optional=True)
    return data


def check_startup(path: Path, data: object) -> dict:
    """`bench_startup`: one cold run and the warm runs, piece by piece."""
    f = Fields(path, data)
    f.env()
    f.mapping("cold")
    warm = f.get("warm")
    if not isinstance(warm, list) or not warm or not all(isinstance(w, dict) for w in warm):
        f.refuse("warm", "a list of one or more runs")
    for piece in PIECES:
        f.seconds(f"cold.{piece}", optional=piece not in ("startup_s",))
        for i, _ in enumerate(warm):
            Fields(path, warm[i]).seconds(piece, optional=piece not in ("startup_s",))
    return data


def check_probe(path: Path, data: object) -> dict:
    f = Fields(path, data)
    f.env()
    f.positive("attainable_fp32.gflops")
    return data


def _floor(f: Fields, pooled: bool = False) -> None:
    """A `floor` record (step_breakdown.floor_record): one process's rounds, or several processes pooled."""
    f.seconds("floor.step_ms")
    f.positive("floor.images_per_s")
    f.interval("floor.images_per_s_ci95")
    f.positive("floor.gflops")
    if pooled:
        f.number("floor.processes", 2, 1000, integer=True)
        f.numbers("floor.step_ms_per_process")
        f.interval("floor.images_per_s_pi95")
    else:
        f.numbers("floor.step_ms_per_round")


def check_breakdown(path: Path, data: object) -> dict:
    """`step_breakdown`: the floor's rounds, the profiled step's categories, the step's limit."""
    f = Fields(path, data)
    f.env()
    _floor(f)
    f.seconds("profiled.step_ms")
    cats = f.mapping("profiled.categories")
    for name in cats:
        f.seconds(f"profiled.categories.{name}.ms")
    for key in ("convolutions_ms", "elementwise_ms", "optimizer_ms", "step_ms"):
        f.seconds(f"limit.{key}")
    f.positive("limit.efficiency")
    f.positive("limit.bandwidth.gbs")
    f.positive("attainable_fp32.gflops")
    if f.get("inductor_config", optional=True) is not None:
        f.mapping("inductor_config")
    return data


def check_floor(path: Path, data: object) -> dict:
    """`step_breakdown --floor-only`: one process's floor, or several processes' pooled floor."""
    f = Fields(path, data)
    f.env()
    _floor(f, pooled=f.get("floor.processes", optional=True) is not None)
    f.positive("flops.train_step")
    return data


def check_machine_note(path: Path, data: object) -> dict:
    """machine.json: the hand-kept description of a machine whose JSONs predate `env.machine`."""
    f = Fields(path, data)
    f.text("cpu_model")
    f.text("isa")
    f.number("logical_cpus", 1, 1 << 20, integer=True)
    if f.get("commits", optional=True) is not None:
        commits = f.get("commits")
        if not isinstance(commits, list) or not all(isinstance(c, str) for c in commits):
            f.refuse("commits", "a list of commit hashes")
    return data


def read_checked(path: Path, check) -> dict | None:
    """A results JSON read and checked; None only when the file does not exist."""
    data = read_json(path)
    return None if data is None else check(path, data)
