"""A column of the results tables: one machine's folder under docs/results/, its files read as typed records
(records.py) — a bad file refuses the column, it is never dropped — and what the column says of itself."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..utils import UserError
from . import ladder, records
from .machines import belongs, isa_tag, machine_name, note_machine_name

# startup/: bench_startup's files, except the runs of the trainer and a trial of its own.
STARTUP_FILES = {"before-1-epoch.json": records.Run, "spec-seed1-1-epoch.json": records.Run,
                 "try_precompile.json": records.PrecompileFile}


def _short(commit: str | None) -> str:
    commit = commit or "unknown"
    return commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")

ISA_NAMES = {"amx": "AVX-512 + AMX", "avx512": "AVX-512", "avx2": "AVX2", "sve": "SVE", "neon": "NEON", "sse": "SSE"}


class Machine:
    """One folder of docs/results/: what `fastcifar.measure` wrote there (or an earlier layout of it), read as
    typed records (records.py). A column is one machine: every file that records its machine derives the
    folder's name (machines.machine_name), and a file that predates `env.machine` is attributed by the
    folder's machine.json, which derives it too. The files `make results` writes are of one commit; evidence
    folders (option sweeps, forced candidates, start-up rounds) keep their own and are rendered with it."""

    def __init__(self, folder: Path, root: Path | None = None):
        self.folder, self.name = folder, folder.name
        self.root = root if root is not None else folder.parent

        def read(path: Path, model: type) -> object:
            return records.read_record(path, model, self.root)

        self.run_paths = sorted((folder / "spec" / "runs").glob("*.json"))
        self.runs = [read(p, records.Run) for p in self.run_paths]
        self.loader = read(folder / "bench_loader.json", records.LoaderFile)
        self.e2e = read(folder / "bench_end_to_end.json", records.EndToEndFile)
        self.startup = read(folder / "bench_startup.json", records.StartupFile)
        self.cold = read(folder / "cold-start.json", records.Run)
        self.probe = read(folder / "probe.json", records.ProbeFile)
        self.breakdown = read(folder / "step_breakdown.json", records.BreakdownFile)
        self.floor = read(folder / "floor.json", records.FloorFile)
        # end to end in further separate processes (make results' end-to-end-2, -3), beside self.e2e's
        self.e2e_processes = [(p, read(p, records.EndToEndFile))
                              for p in sorted((folder / "end-to-end-processes").glob("*.json"))]
        # the floor's processes: each its own limit too where measured so (a breakdown without trace)
        self.floor_processes = [(p, self._floor_process(p))
                                for p in sorted((folder / "floor-processes").glob("*.json"))]
        # the loader alone in further separate processes (make results' loader-2, -3), beside self.loader's
        self.loader_processes = [(p, read(p, records.LoaderFile))
                                 for p in sorted((folder / "loader-processes").glob("*.json"))]
        self.measure = read(folder / "measure.json", records.MeasureFile)
        self.summary = read(folder / "spec" / "summary.json", records.SpecSummary)
        self.note = read(folder / "machine.json", records.MachineNote) or {}
        # Evidence kept beside the column, each file with its own commit (rendered with it).
        self.candidates = [(p, read(p, records.EndToEndFile))
                           for p in sorted((folder / "end-to-end-candidates").glob("*.json"))]
        self.option_sweeps = [(f, [(p, read(p, records.BreakdownFile)) for p in sorted(f.glob("*.json"))
                                   if p.name != "options.json"])
                              for f in sorted(folder.glob("step-options*")) if f.is_dir()]
        self.startup_before = read(folder / "startup" / "before-compile.json", records.StartupFile)
        startup = folder / "startup"
        self.startup_files = {p.name: read(p, STARTUP_FILES.get(p.name, records.StartupFile))
                              for p in sorted(startup.glob("*.json"))}
        self.options = [(p, read(p, records.LoaderFile)) for p in sorted((folder / "options").glob("*.json"))]
        self.setup = read(folder / "setup.json", records.SetupFile)
        # spdl/: --loader spdl beside ffcv, isolated and end to end, one process per file (their own commit)
        self.spdl = [(p, read(p, records.LoaderFile if p.name.startswith("isolated") else records.EndToEndFile))
                     for p in sorted((folder / "spdl").glob("*.json"))]
        # ladder/: plain PyTorch -> fastcifar, one change per rung (its own commit until make results runs it)
        self.ladder = read(folder / "ladder" / "ladder.json", ladder.LadderFile)
        main = [(p, r) for p, r in [*zip(self.run_paths, self.runs, strict=True),
                                    (folder / "bench_loader.json", self.loader),
                                    (folder / "bench_end_to_end.json", self.e2e),
                                    (folder / "bench_startup.json", self.startup),
                                    (folder / "cold-start.json", self.cold), (folder / "probe.json", self.probe),
                                    (folder / "step_breakdown.json", self.breakdown),
                                    (folder / "floor.json", self.floor), *self.e2e_processes,
                                    *self.floor_processes, *self.loader_processes] if r is not None]
        evidence = [*self.candidates, *(pr for _, sweep in self.option_sweeps for pr in sweep), *self.options,
                    *((startup / name, r) for name, r in self.startup_files.items()),
                    *([(folder / "setup.json", self.setup)] if self.setup else []), *self.spdl,
                    *([(folder / "ladder" / "ladder.json", self.ladder)] if self.ladder else [])]
        self.envs = [r.env for _, r in main]
        if not self.envs:
            raise UserError(f"{folder}: no results JSON with an env")
        self._check_machine([*main, *evidence])
        self._check_seeds()
        self._check_pooled()
        self._check_graphs(main)
        commits = self.commits()
        listed = set(self.note.get("commits") or [])
        if len(commits) > 1 and not set(commits) <= listed:
            column = Counter(_short(r.env.git_commit) for _, r in main).most_common(1)[0][0]
            where, other = next((p, _short(r.env.git_commit)) for p, r in main
                                if _short(r.env.git_commit) not in {column, *listed})  # a commit nothing allows
            raise UserError(f"{where}: measured at {other}, the column's other files at {column}: a column is "
                            "measured at one commit (make results), or its machine.json lists them")

    def _check_machine(self, files: list[tuple[Path, object]]) -> None:
        """Every file's machine derives this folder's name; files without one need machine.json, which must too."""
        if self.note:
            derived = note_machine_name(self.note)
            if derived != self.name:
                raise UserError(f"{self.folder / 'machine.json'}: describes the machine {derived!r}, not {self.name!r}")
        for path, record in files:
            env = record.env
            if env.machine is None:
                if not self.note:
                    raise UserError(f"{path}: records no machine (it predates env.machine) and "
                                    f"{self.folder / 'machine.json'} is missing")
                continue
            if not belongs(env, self.name):
                raise UserError(f"{path}: measured on {machine_name(env)!r}, not on this column's machine "
                                f"{self.name!r}")

    def _check_seeds(self) -> None:
        """The spec's seeds: each once, 0..N-1 without a gap, one loader, one batch, named by loader and
        seed, and those its summary.json aggregated."""
        where = self.folder / "spec" / "runs"
        for path, run in zip(self.run_paths, self.runs, strict=True):
            if path.stem != f"{run.config.loader}-seed{run.config.seed}":
                raise UserError(f"{path}: records config.loader {run.config.loader!r} and config.seed "
                                f"{run.config.seed}, not what its name says")
        loaders = sorted({r.config.loader for r in self.runs})
        if len(loaders) > 1:
            raise UserError(f"{where}: runs of several loaders ({', '.join(loaders)}) in one spec")
        batches = sorted({r.config.batch_size for r in self.runs}
                         | {f.batch for f in (self.breakdown, self.floor) if f is not None})
        if len(batches) > 1:
            raise UserError(f"{where}: batch sizes {', '.join(map(str, batches))} in one column "
                            "(spec runs, step_breakdown.json, floor.json)")
        seeds = sorted(r.config.seed for r in self.runs)
        if len(set(seeds)) != len(seeds):
            raise UserError(f"{where}: a seed appears twice ({', '.join(map(str, seeds))})")
        if seeds and seeds != list(range(len(seeds))):
            raise UserError(f"{where}: seeds {', '.join(map(str, seeds))} are not 0..{len(seeds) - 1}: "
                            "a run is missing")
        if self.runs and self.summary is not None:
            told = sorted(s for group in self.summary.loaders.values() for s in group.seeds)
            if told and told != seeds:
                raise UserError(f"{where}: holds seeds {', '.join(map(str, seeds))}, its summary.json aggregated "
                                f"{', '.join(map(str, told))}")

    def _check_graphs(self, files: list[tuple[Path, object]]) -> None:
        """Training and its floor ran the same graphs: where files record them (precompile.graphs), one shape
        rule (static or dynamic) in the column, and the floor's batch among every spec run's static sizes."""
        recorded = [(p, r.graphs) for p, r in files if getattr(r, "graphs", None) is not None]
        if len({g.dynamic for _, g in recorded}) > 1:
            raise UserError(f"{self.folder}: files compiled with static and with dynamic shapes in one column "
                            f"({', '.join(str(p.relative_to(self.folder)) for p, _ in recorded)})")
        floors = {b for p, g in recorded if "floor" in p.name or "step_breakdown" in p.name or
                  "floor-processes" in p.parts for b in g.batch_sizes}
        for path, run in zip(self.run_paths, self.runs, strict=True):
            if run.graphs is not None and not run.graphs.dynamic and not floors <= set(run.graphs.batch_sizes):
                raise UserError(f"{path}: compiled batch sizes {run.graphs.batch_sizes}, not the floor's "
                                f"{sorted(floors)}: training and its floor ran different graphs")

    def _floor_process(self, path: Path) -> records.FloorFile | None:
        """One floor process: a BreakdownFile where it measured its limit, else a FloorFile."""
        data = records.read_json(path, self.root)
        if data is None:
            return None
        return records.parse(path, data, records.BreakdownFile if isinstance(data, dict) and "limit" in data
                             else records.FloorFile)

    def step_limit_ratios(self) -> list[float]:
        """The compute-only step over its own limit, one ratio per floor process that measured its limit."""
        return [r.floor.step_ms / r.limit.step_ms for _, r in self.floor_processes
                if r is not None and getattr(r, "limit", None) is not None]

    def loader_ratios(self) -> list[float]:
        """ffcv / torch images/s, isolated, in each separate process (bench_loader.json, loader-processes/)."""
        files = [self.loader, *(r for _, r in self.loader_processes)]
        return [f.pipelines["ffcv"].images_per_s / f.pipelines["torch"].images_per_s for f in files
                if f is not None and "ffcv" in f.pipelines and "torch" in f.pipelines]

    def e2e_files(self) -> list[records.EndToEndFile]:
        """The end-to-end processes (bench_end_to_end.json, end-to-end-processes/) that ran ffcv and synthetic."""
        return [f for f in [self.e2e, *(r for _, r in self.e2e_processes)]
                if f is not None and "ffcv" in f.pipelines and "synthetic" in f.pipelines]

    def _check_pooled(self) -> None:
        """floor.json's pooled floor is the mean of the floor-processes/ files it names, value by value."""
        if not (self.floor and self.floor.floor.processes):
            return
        pooled = self.floor.floor
        by_name = {f"floor-processes/{p.name}": r for p, r in self.floor_processes}
        for k, (name, value) in enumerate(zip(pooled.files or [], pooled.step_ms_per_process, strict=True)):
            held = by_name.get(name)
            if held is None:
                raise UserError(f"{self.folder / 'floor.json'}: pools {name}, which is missing")
            if not records.close(held.floor.step_ms, value, rel=1e-9):
                raise UserError(f"{self.folder / 'floor.json'}: field 'floor.step_ms_per_process.{k}' is {value:g}, "
                                f"{name} holds {held.floor.step_ms:g}")

    def compute_floor(self) -> dict | None:
        """The column's compute-only floor: several processes pooled (floor.json) where measured, else the
        breakdown's one process, else (before step_breakdown existed) bench_loader's compute-only rounds.
        Keys: images_per_s, its interval `ci` and what that interval is (`of`), flops_per_image."""
        if self.floor and self.floor["floor"].get("processes"):
            f = self.floor["floor"]
            return {"images_per_s": f["images_per_s"], "ci": f.get("images_per_s_pi95"),
                    "of": f"{f['processes']} processes; 95 % prediction interval of one more",
                    "flops_per_image": self.floor["flops"]["train_step"] / self.floor["batch"]}
        if self.breakdown:
            f = self.breakdown["floor"]
            return {"images_per_s": f["images_per_s"], "ci": f.get("images_per_s_ci95"),
                    "of": f"one process, {f['rounds']} rounds; 95 % CI",
                    "flops_per_image": self.breakdown["flops"]["train_step"] / self.breakdown["batch"]}
        f = (self.loader or {}).get("compute_only")
        if not f:
            return None
        return {"images_per_s": f["images_per_s"], "ci": f.get("images_per_s_ci95"),
                "of": f"one process, {f.get('rounds', 1)} rounds; 95 % CI",
                "flops_per_image": self.loader.get("flops_per_image")}

    def rate(self) -> float | None:
        """The column's one attainable fp32 rate (GFLOP/s): its own probe, measured once by `make results`
        (probe.json); every utilisation of the column divides by it. None before the probe existed."""
        return self.probe["attainable_fp32"]["gflops"] if self.probe else None

    @property
    def env(self) -> records.Env:
        """The newest env that records the machine, else the first."""
        return next((e for e in self.envs if e.machine is not None), self.envs[0])

    def commits(self) -> list[str]:
        seen: list[str] = []
        for env in self.envs:
            short = _short(env.git_commit)
            if short not in seen:
                seen.append(short)
        return seen

    def date(self) -> str:
        return max((e.get("date") or "" for e in self.envs), default="") or self.note.get("date", "")

    def label(self) -> str:
        mach = self.env.get("machine") or {}
        model = mach.get("cpu_model") or self.note.get("cpu_model") or self.env.get("device_name")
        isa = ISA_NAMES.get(isa_tag(mach["cpu_flags"]) if mach.get("cpu_flags") else self.note.get("isa"), "?")
        cpus = mach.get("usable_cpus") or self.note.get("logical_cpus")
        gpu = (self.env.get("gpu") or {}).get("name")
        family, number = (mach.get("cpu_family") or self.note.get("cpu_family"),
                          mach.get("cpu_model_number") or self.note.get("cpu_model_number"))
        which = f" family {family} model {number}" if family is not None and number is not None else ""
        return (f"{gpu}, " if gpu else "") + f"{model}{which}, {cpus} cores ({isa})"

    def heading(self) -> str:
        commits = self.commits()
        return (f"{self.label()}<br>torch {self.env.get('torch')}, {self.date()}, "
                f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}")


def machines(root: Path) -> list[Machine]:
    """Every machine folder under root, newest first (then by name: a stable order)."""
    found = [Machine(p, root) for p in sorted(root.iterdir()) if p.is_dir() and any(p.glob("*.json"))]
    if not found:
        raise UserError(f"no machine folders with results under {root}: run make results")
    return sorted(found, key=lambda m: (m.date(), m.name), reverse=True)
