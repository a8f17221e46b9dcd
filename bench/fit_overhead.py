"""What a Ray Train ``fit()`` costs before any training: wall-clock to the loop's first line
and to ``fit()``'s return, and the CPU-seconds of every process it starts, by role.

Runs ``--fits`` TorchTrainer fits of a loop that only reports once, on a private local Ray,
and samples ``/proc`` every 0.2 s for the CPU time of each process (Ray names its actor
processes ``ray::<Class>``; a process that lives less than one sample is missed, so the
figures are a lower bound). Both sides of the suite-time question in one run: the same
fits with Ray Train's PreemptionWatcher on (Ray's default) and off (the test suite's
setting). Linux only.

    python bench/fit_overhead.py [--fits 4] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

from effray.hardware import cpu_summary

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_and_name(pid: str) -> tuple[float, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0")[:2]]
        name = argv[0] if argv[0].startswith("ray::") else " ".join(os.path.basename(a) for a in argv).strip()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK, name


def _busy_cpu_s() -> float:
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


class Sampler(threading.Thread):
    """Per-process CPU seconds gained while it runs, keyed by pid (last name seen)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.start_cpu: dict[str, float] = {}
        self.last: dict[str, tuple[float, str]] = {}
        self.stopped = threading.Event()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            seen = _cpu_and_name(pid)
            if seen:
                self.start_cpu[pid] = seen[0]

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                seen = _cpu_and_name(pid)
                if seen:
                    self.last[pid] = seen

    def by_role(self) -> dict[str, float]:
        roles: dict[str, float] = defaultdict(float)
        for pid, (cpu, name) in self.last.items():
            role = (
                name
                if name.startswith("ray::")
                else ("this driver" if pid == str(os.getpid()) else name or "(exited before a later sample)")
            )
            roles[role] += cpu - self.start_cpu.get(pid, 0.0)
        return dict(roles)


def _probe(mark: str) -> None:
    """The training loop: write when it starts, report once."""
    import ray.train

    with open(mark, "w") as f:
        f.write(str(time.time()))
    ray.train.report({"done": 1})


def run_fits(fits: int, workers: int, preemption_watcher: bool) -> None:
    """In a child process, so that each setting gets a fresh Ray reading its environment."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1" if preemption_watcher else "0"
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as the tests
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    work = tempfile.mkdtemp(prefix="effray-bench-fit-")
    mark = os.path.join(work, "loop-started")
    TorchTrainer(
        lambda: _probe(mark),
        scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(storage_path=work, name="warm"),
    ).fit()  # Ray's own start-up
    sampler, busy0 = Sampler(), _busy_cpu_s()
    sampler.start()
    to_loop, to_end = [], []
    for i in range(fits):
        t0 = time.time()
        TorchTrainer(
            lambda: _probe(mark),
            scaling_config=ScalingConfig(num_workers=workers),
            run_config=RunConfig(storage_path=work, name=f"fit{i}"),
        ).fit()
        to_end.append(time.time() - t0)
        with open(mark) as f:
            to_loop.append(float(f.read()) - t0)
    sampler.stopped.set()
    sampler.join()
    busy = _busy_cpu_s() - busy0
    roles = sampler.by_role()
    watcher = "on " if preemption_watcher else "off"
    print(
        f"PreemptionWatcher {watcher}: loop starts {sum(to_loop) / fits:.1f} s after fit(), fit() returns after "
        f"{sum(to_end) / fits:.1f} s; machine busy {busy / fits:.1f} CPU-s per fit",
        flush=True,
    )
    for role, cpu in sorted(roles.items(), key=lambda kv: -kv[1]):
        if cpu / fits >= 0.05:
            print(f"    {role:<40} {cpu / fits:5.2f} CPU-s per fit", flush=True)
    print(f"RESULT busy_per_fit={busy / fits:.2f}", flush=True)
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fits", type=int, default=4, help="timed fits per setting (after one untimed warm-up fit)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per fit")
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_fits(args.fits, args.workers, args.child == "on")
        return
    print(
        f"{cpu_summary()}, {os.cpu_count()} cores; {args.fits} fits of {args.workers} worker(s) per setting", flush=True
    )
    busy = {}
    for setting in ("on", "off"):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray
        child = subprocess.run(
            [sys.executable, __file__, "--fits", str(args.fits), "--workers", str(args.workers), "--child", setting],
            capture_output=True,
            text=True,
            env=env,
        )
        if child.returncode != 0:
            raise SystemExit(f"the PreemptionWatcher-{setting} run failed:\n{child.stderr[-3000:]}")
        out = child.stdout
        print("\n".join(ln for ln in out.splitlines() if not ln.startswith("RESULT")), flush=True)
        busy[setting] = float(out.rsplit("busy_per_fit=", 1)[1].split()[0])
    print(f"ratio_busy_cpu_watcher_off_vs_on={busy['off'] / busy['on']:.2f}")


if __name__ == "__main__":
    main()
