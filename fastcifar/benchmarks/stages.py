"""The one stage runner behind `make results` (measure.py) and `make gpu-check` (gpu_check.py): child
commands in order, within a time budget, each with its log; a report rewritten after every stage, so a
command killed mid-way still says what ran; stages already done skipped (resumption); and children
that end with their parent.

Why children must end with it: a stage left running after Ctrl-C or SIGTERM writes its JSON after the
parent exited, and a rerun straight after measures beside it (two things timed at once on one machine).
So each child runs in its own process group (its own children with it), and the parent, interrupted
or failing, terminates that group and waits for it before it exits; on Linux a child is also sent
SIGTERM by the kernel if the parent dies without that chance (SIGKILL).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..utils import UserError

PR_SET_PDEATHSIG = 1
GRACE_S = 10.0  # how long a terminated stage may take to exit before it is killed


def parse_stages(text: str | None, known: list[str]) -> list[str]:
    """--stages a,b: the chosen stages in the runner's order; None: all. An empty or unknown name is an error."""
    if text is None:
        return list(known)
    chosen = [name.strip() for name in text.split(",")]
    unknown = [name or "(empty)" for name in chosen if name not in known]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [name for name in known if name in chosen]


def check_budget(budget_s: float) -> float:
    """A budget in seconds: finite and at least 0 (0: none)."""
    if not (budget_s >= 0 and budget_s != float("inf")):  # also refuses nan
        raise UserError(f"--budget-s must be a number of seconds >= 0 (0: no limit), got {budget_s}")
    return budget_s


ENDING = {signal.SIGINT, signal.SIGTERM}  # held off while a child starts, so that none starts unwatched


def _child_setup() -> None:  # runs in the child between fork and exec
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ENDING)  # a blocked mask would survive exec
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _end_group(proc: subprocess.Popen) -> None:
    """Terminate the child's process group, kill it after GRACE_S, and reap the child."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM handled like Ctrl-C inside the block (KeyboardInterrupt), so the same clean-up runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class StageRunner:
    """Stages run so far (`stages`: name -> rc, seconds, log, last line) and the budget.

    `report(stages)` is called after every change; `estimate(name)` gives the seconds a stage is expected
    to take (a stage that does not fit in what is left is skipped); `done(name)` returns why a stage
    needs no run (resumption) or None; `echo` prints each line a stage writes (else only its log has them).
    """

    def __init__(self, out: Path, budget_s: float | None, report: Callable[[dict], object],
                 estimate: Callable[[str], float], done: Callable[[str], str | None] | None = None,
                 echo: bool = False):
        self.out, self.budget_s, self.report, self.estimate, self.done = out, budget_s, report, estimate, done
        self.echo = echo
        self.started = time.perf_counter()
        self.stages: dict[str, dict] = {}

    def time_left(self) -> float:
        return float("inf") if not self.budget_s else self.budget_s - (time.perf_counter() - self.started)

    def note(self, name: str, rc: object, seconds: float, last_line: str = "", log: str | None = None) -> None:
        self.stages[name] = {"rc": rc, "seconds": round(seconds, 1), "log": log, "last_line": last_line}
        self.report(self.stages)

    def skip(self, name: str, why: str, tag: str = "") -> None:
        self.note(name, "skipped", 0.0, why)
        print(f"{tag or f'[{name}]'} skipped: {why}", flush=True)

    def failed(self) -> list[str]:
        return [k for k, v in self.stages.items() if v["rc"] not in (0, "skipped", "kept")]

    def skipped(self) -> list[str]:
        return [k for k, v in self.stages.items() if v["rc"] == "skipped"]

    def run(self, name: str, cmd: list[str], env: dict[str, str], timeout_s: float | None = None,
            budgeted: bool = True, tag: str = "") -> bool:
        """One stage as a child process, its output in OUT/logs/NAME.log, within the time left (unless not
        `budgeted`: the data every stage needs) and `timeout_s`; noted. True when it succeeded."""
        tag = tag or f"[{name}]"
        if self.done and (why := self.done(name)):
            print(f"{tag} {why} (kept)", flush=True)
            self.note(name, "kept", 0.0, why)
            return True
        left = self.time_left() if budgeted else float("inf")
        if left < self.estimate(name):
            self.skip(name, f"budget: {max(left, 0):.0f} s left, the stage takes ~{self.estimate(name):.0f} s "
                            f"(run it alone with --stages {name})", tag)
            return False
        limit = min(timeout_s or float("inf"), left)
        log = self.out / "logs" / f"{name}.log"
        print(f"{tag} {' '.join(cmd)}  (log: {log})", flush=True)
        t0 = time.perf_counter()
        rc = self._child(cmd, env, log, None if limit == float("inf") else max(1.0, limit))
        if rc == "timeout" and timeout_s is not None and limit < timeout_s:
            rc = "timeout (budget)"
        seconds = time.perf_counter() - t0
        lines = log.read_text(errors="replace").strip().splitlines()
        last = lines[-1].strip() if lines else ""
        self.note(name, rc, seconds, last, str(log.relative_to(self.out)))
        ok = rc == 0
        print(f"{tag} {'ok' if ok else f'FAILED ({rc})'} in {seconds:.0f} s" + ("" if ok else f": {last[:160]}"),
              flush=True)
        return ok

    def _child(self, cmd: list[str], env: dict[str, str], log: Path, limit: float | None) -> int | str:
        with open(log, "w") as f, sigterm_as_interrupt():
            held = signal.pthread_sigmask(signal.SIG_BLOCK, ENDING)
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1, errors="replace",
                                        start_new_session=True, preexec_fn=_child_setup)
            except BaseException:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
                raise
            timed_out = threading.Event()

            def expire() -> None:
                timed_out.set()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)

            timer = threading.Timer(limit, expire) if limit else None
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal that came meanwhile lands here
                if timer:
                    timer.start()
                for line in proc.stdout:
                    f.write(line)
                    if self.echo and line.strip() and "\r" not in line and not line.rstrip().endswith(
                            ("it/s]", "batch/s]")):  # the stage's progress lines, not its progress bars
                        print(f"  {line.rstrip()[:160]}", flush=True)
                rc = proc.wait()
            finally:  # interrupted (Ctrl-C, SIGTERM) or failing: the stage and its children end here
                if timer:
                    timer.cancel()
                if proc.poll() is None:
                    _end_group(proc)
                else:  # the child exited; anything it left in its group ends too
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGTERM)
        return "timeout" if timed_out.is_set() else rc
