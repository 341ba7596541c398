"""A column of the results tables: one machine's folder under docs/results/, its files read and checked
(schema.py) — a bad file refuses the column, it is never dropped — and what the column says of itself."""

from __future__ import annotations

from pathlib import Path

from ..utils import UserError
from . import schema
from .machines import isa_tag

ISA_NAMES = {"amx": "AVX-512 + AMX", "avx512": "AVX-512", "avx2": "AVX2", "sve": "SVE", "neon": "NEON", "sse": "SSE"}


class Machine:
    """One folder of docs/results/: what `fastcifar.measure` wrote there (or an earlier layout of it)."""

    def __init__(self, folder: Path):
        self.folder, self.name = folder, folder.name
        runs = sorted((folder / "spec" / "runs").glob("*.json"))
        self.runs = [schema.read_checked(p, schema.check_run) for p in runs]
        self.loader = schema.read_checked(folder / "bench_loader.json", schema.check_loader)
        self.e2e = schema.read_checked(folder / "bench_end_to_end.json", schema.check_end_to_end)
        self.startup = schema.read_checked(folder / "bench_startup.json", schema.check_startup)
        self.cold = schema.read_checked(folder / "cold-start.json", schema.check_run)
        self.probe = schema.read_checked(folder / "probe.json", schema.check_probe)
        self.breakdown = schema.read_checked(folder / "step_breakdown.json", schema.check_breakdown)
        self.floor = schema.read_checked(folder / "floor.json", schema.check_floor)
        # end to end in further separate processes (make results' end-to-end-2, -3), beside self.e2e's
        self.e2e_processes = [(p, schema.read_checked(p, schema.check_end_to_end))
                              for p in sorted((folder / "end-to-end-processes").glob("*.json"))]
        self.note = schema.read_checked(folder / "machine.json", schema.check_machine_note) or {}
        files = [*self.runs, self.loader, self.e2e, self.startup, self.cold, self.probe, self.breakdown, self.floor]
        self.envs = [f["env"] for f in files if f and "env" in f]
        if not self.envs:
            raise UserError(f"{folder}: no results JSON with an env")
        if not any("machine" in e for e in self.envs) and not self.note:
            raise UserError(f"{folder}: no record of the machine: its JSONs predate env.machine and machine.json "
                            "is missing")
        self._check_seeds()
        commits = self.commits()
        if len(commits) > 1 and not set(commits) <= set(self.note.get("commits") or []):
            raise UserError(f"{folder}: its JSONs were measured at several commits ({', '.join(commits)}): "
                            "a column is measured at one (make results), or its machine.json lists them")

    def _check_seeds(self) -> None:
        """The spec's seeds: each once, 0..N-1 without a gap, and those its summary.json aggregated."""
        seeds = sorted(r["config"]["seed"] for r in self.runs)
        where = self.folder / "spec" / "runs"
        if len(set(seeds)) != len(seeds):
            raise UserError(f"{where}: a seed appears twice ({', '.join(map(str, seeds))})")
        if seeds and seeds != list(range(len(seeds))):
            raise UserError(f"{where}: seeds {', '.join(map(str, seeds))} are not 0..{len(seeds) - 1}: "
                            "a run is missing")
        summary = schema.read_json(self.folder / "spec" / "summary.json")
        if self.runs and isinstance(summary, dict):
            told = sorted(s for group in (summary.get("loaders") or {}).values() if isinstance(group, dict)
                          for s in group.get("seeds") or [])
            if told and told != seeds:
                raise UserError(f"{where}: holds seeds {', '.join(map(str, seeds))}, its summary.json aggregated "
                                f"{', '.join(map(str, told))}")

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
    def env(self) -> dict:
        """The newest env that records the machine, else the first."""
        return next((e for e in self.envs if "machine" in e), self.envs[0])

    def commits(self) -> list[str]:
        seen: list[str] = []
        for env in self.envs:
            commit = (env.get("git_commit") or "unknown")
            short = commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")
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
        return (f"{gpu}, " if gpu else "") + f"{model}, {cpus} cores ({isa})"

    def heading(self) -> str:
        commits = self.commits()
        return (f"{self.label()}<br>torch {self.env.get('torch')}, {self.date()}, "
                f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}")


def machines(root: Path) -> list[Machine]:
    """Every machine folder under root, newest first (then by name: a stable order)."""
    found = [Machine(p) for p in sorted(root.iterdir()) if p.is_dir() and any(p.glob("*.json"))]
    if not found:
        raise UserError(f"no machine folders with results under {root}: run make results")
    return sorted(found, key=lambda m: (m.date(), m.name), reverse=True)
