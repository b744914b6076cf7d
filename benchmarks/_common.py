"""Scaffolding shared by the benchmark scripts (see README.md and ../shared/BENCHMARKS.md).

Every benchmark builds the same tiny LLaVA, then runs each side **in its own subprocess, one after the
other** (per-side peak RSS, never two sides on the 2 cores at once): the parent re-invokes the script with
``--child <side> --workdir <dir>`` plus the flags the side needs, the child writes ``result_<side>.json``
(with its torch threads and peak RSS), and the parent records the machine load around the run and re-runs
a side that other processes slowed down. The summary reports median times, per-side peak RSS, whether the
machine stayed idle, and the settings and versions; ``--json`` prints it as the last stdout line.

Nothing here imports torch or mmalign at module level (only inside the functions that need them), so a
side that must import no mmalign code (the peer) may still use these helpers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SEED = 0
MODEL_SHAPE: dict[str, Any] = {
    "arch": "llava",
    "image_size": 96,
    "patch_size": 8,
    "vision_hidden": 256,
    "vision_layers": 2,
    "text_hidden": 256,
    "text_layers": 4,
    "heads": 4,
}
"""The tiny LLaVA every benchmark trains or samples (96 px images, 8 px patches → 144 image tokens)."""

RETRY_WAIT_S = 120.0
"""A re-run waits at least this long for the machine to become idle."""
IDLE_CORES = 0.3
"""The machine counts as idle when other processes keep fewer cores than this busy."""

# ----------------------------------------------------------------------------------------------- model


def build_tiny_llava(folder: Path, image_size: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Build the seeded tiny LLaVA of ``MODEL_SHAPE`` (``image_size`` overrides its image size) and save it
    to ``folder``. Returns its processor and the ``settings.model`` entry (the shape, parameter count and
    image tokens per image)."""
    from mmalign.models.tiny import build_tiny

    shape = {k: v for k, v in MODEL_SHAPE.items() if k != "arch"}
    if image_size is not None:
        shape["image_size"] = image_size
    model, processor = build_tiny(MODEL_SHAPE["arch"], folder, seed=SEED, **shape)
    n_params = sum(p.numel() for p in model.parameters())
    return processor, {
        **MODEL_SHAPE,
        **shape,
        "params": n_params,
        "image_tokens": (shape["image_size"] // shape["patch_size"]) ** 2,
    }


# ----------------------------------------------------------------------------------------------- machine load


def loadavg() -> float:
    """1-minute load average of the machine."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def busy_cores(interval: float = 3.0) -> float:
    """How many cores the machine keeps busy, sampled over ``interval`` seconds."""
    before = busy_cpu_s()
    time.sleep(interval)
    return (busy_cpu_s() - before) / interval


def wait_for_idle(max_wait_s: float) -> float:
    """Sample the busy cores until they drop below ``IDLE_CORES`` or ``max_wait_s`` passed; return the last
    sample. (Busy cores, not the load average: that would still count our own previous side.)"""
    deadline = time.monotonic() + max_wait_s
    busy = busy_cores()
    while busy >= IDLE_CORES and time.monotonic() < deadline:
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        busy = busy_cores()
    return busy


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------- command line


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a benchmark: described by the first paragraph of its docstring ``doc``, with
    ``--json``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    return parser


def add_step_args(parser: argparse.ArgumentParser, pairs_help: str) -> None:
    """Add the flags of a training-step benchmark: ``--steps``, ``--warmup``, ``--pairs`` (described by
    ``pairs_help``), ``--batch`` and ``--threads``. See ``check_step_args``."""
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--pairs", type=int, default=256, help=pairs_help)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per side")
    parser.add_argument(
        "--image-size",
        type=int,
        default=MODEL_SHAPE["image_size"],
        help=f"image side in pixels (patch {MODEL_SHAPE['patch_size']}: 96 → 144 image tokens, "
        "192 → 576 as in LLaVA-1.5)",
    )


def check_step_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error unless ``--pairs >= --batch``, ``--steps >= 1`` and ``--warmup >= 0``."""
    if args.pairs < args.batch or args.steps < 1 or args.warmup < 0:
        parser.error("need --pairs >= --batch, --steps >= 1 and --warmup >= 0")


def add_side_args(parser: argparse.ArgumentParser, sides: Sequence[str], keep: bool = False) -> None:
    """Add ``--wait-idle`` and ``--retries`` (how sides are re-run), ``--keep`` (if ``keep``: work in a
    given folder, see ``scratch_dir``) and the hidden ``--child`` / ``--workdir`` flags with which the
    parent runs one of ``sides`` in a subprocess."""
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each side, wait up to this many seconds for the machine to be idle",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a side that other processes slowed down"
    )
    if keep:
        parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--child", choices=tuple(sides), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, child: Callable[[argparse.Namespace], None]
) -> argparse.Namespace:
    """Parse ``argv`` and return the arguments; but in a side's subprocess (``--child``, see
    ``add_side_args``) run ``child(args)`` and exit with status 0."""
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        raise SystemExit(0)
    return args


def child_flags(args: argparse.Namespace, names: Iterable[str]) -> list[str]:
    """The command-line flags that pass ``args.<name>`` on to a side's subprocess (``new_tokens`` →
    ``--new-tokens``)."""
    return [x for name in names for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


@contextmanager
def scratch_dir(prefix: str, keep: Path | None = None) -> Iterator[Path]:
    """A temporary work folder, deleted afterwards; or ``keep`` (created if need be), which is kept."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir


def print_result(
    summary: dict[str, Any], as_json: bool, print_text: Callable[[dict[str, Any]], None]
) -> None:
    """With ``--json`` print the summary as one JSON object on the last stdout line, else ``print_text``."""
    if as_json:
        print(json.dumps(summary))
    else:
        print_text(summary)


# ----------------------------------------------------------------------------------------------- child


def timed_steps(n: int, step_s: list[float]) -> Iterator[int]:
    """``range(n)`` that appends each step's wall time to ``step_s``: from the end of the previous step (for
    the first, from the start of the loop) to the end of this one, i.e. when the loop asks for the next."""
    last = time.perf_counter()
    for i in range(n):
        yield i
        now = time.perf_counter()
        step_s.append(now - last)
        last = now


def run_child(side: str, workdir: Path, threads: int, run: Callable[[], dict[str, Any]]) -> None:
    """Entry point of a side's subprocess: set the torch threads, ``run()`` the side, add the threads it
    used and its peak RSS to the result and write ``result_<side>.json`` for the parent."""
    import torch

    torch.set_num_threads(threads)
    result = run()
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = peak_rss_mb()
    (workdir / f"result_{side}.json").write_text(json.dumps(result), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- parent


def run_side_once(
    script: Path, side: str, workdir: Path, flags: Sequence[str], wait_idle_s: float
) -> dict[str, Any]:
    """Run one side (``script --child side --workdir workdir *flags``) in a fresh Python process and read
    its result, plus the machine load around it as ``load``: ``busy_cores_before`` (after waiting up to
    ``wait_idle_s`` for idle) and ``foreign_busy_cores`` = cores other processes kept busy while this side
    ran (0 on an idle machine). Exits with the child's output if the side failed."""
    busy = wait_for_idle(wait_idle_s) if wait_idle_s > 0 else busy_cores()
    load = {"loadavg_before": loadavg(), "busy_cores_before": round(busy, 2)}
    if busy >= IDLE_CORES:
        print(
            f"warning: {busy:.2f} cores busy before the {side} side; timings are unreliable", file=sys.stderr
        )
    cmd = [sys.executable, str(script), "--child", side, "--workdir", str(workdir), *flags]
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    usage0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s(), time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    usage1, busy1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s(), time.monotonic() - t0
    own = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    load["foreign_busy_cores"] = round(max(0.0, (busy1 - busy0 - own) / wall), 2)
    path = workdir / f"result_{side}.json"
    if proc.returncode != 0 or not path.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{script.stem}: the {side} side failed (exit code {proc.returncode})")
    return {**json.loads(path.read_text(encoding="utf-8")), "load": load}


def run_side(
    script: Path, side: str, workdir: Path, flags: Sequence[str], wait_idle_s: float, retries: int
) -> dict[str, Any]:
    """``run_side_once``; while other processes kept >= ``IDLE_CORES`` busy during the run (two torch
    processes on 2 cores slow each other down many times over), wait for idle (at least ``RETRY_WAIT_S``)
    and run it again, ``retries`` times at most. ``load.attempts`` counts the runs."""
    result = run_side_once(script, side, workdir, flags, wait_idle_s)
    attempts = 1
    while result["load"]["foreign_busy_cores"] >= IDLE_CORES and attempts <= retries:
        print(
            f"warning: other processes kept {result['load']['foreign_busy_cores']:.2f} cores busy during the "
            f"{side} side; running it again",
            file=sys.stderr,
        )
        result = run_side_once(script, side, workdir, flags, max(wait_idle_s, RETRY_WAIT_S))
        attempts += 1
    result["load"]["attempts"] = attempts
    return result


def run_sides(
    script: Path, sides: Sequence[str], workdir: Path, flags: Sequence[str], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """``run_side`` for every side, **one after the other** (never two sides at once on 2 cores), with
    ``args.wait_idle`` and ``args.retries`` (see ``add_side_args``). Returns the results by side."""
    return {side: run_side(script, side, workdir, flags, args.wait_idle, args.retries) for side in sides}


# ----------------------------------------------------------------------------------------------- summary


def step_settings(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``settings`` entries of a training-step benchmark (see ``add_step_args``): batch size, warm-up and
    timed steps, then ``run_settings`` and ``machine_load``."""
    return {
        "batch_size": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        **run_settings(results),
        "machine_load": machine_load(results),
    }


def median_s(times: Sequence[float], skip: int = 0) -> float:
    """Median of ``times`` after the first ``skip`` (warm-up) entries."""
    return float(statistics.median(times[skip:]))


def machine_idle(results: Iterable[dict[str, Any]]) -> bool:
    """Whether other processes kept fewer than ``IDLE_CORES`` busy before and during every side."""
    return all(
        r["load"]["busy_cores_before"] < IDLE_CORES and r["load"]["foreign_busy_cores"] < IDLE_CORES
        for r in results
    )


def peak_rss_fields(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``<side>_peak_rss_mb`` of every side, in the order of ``results``."""
    return {f"{side}_peak_rss_mb": round(r["peak_rss_mb"], 1) for side, r in results.items()}


def run_settings(
    results: dict[str, dict[str, Any]], dtype: str = "fp32", device: str = "cpu"
) -> dict[str, Any]:
    """The ``settings`` entries every benchmark reports: dtype, device, the torch threads of each side and
    the machine's cores (``machine_load`` is reported next to them, see ``machine_load``)."""
    return {
        "dtype": dtype,
        "device": device,
        "threads": {side: r["threads"] for side, r in results.items()},
        "cpu_count": os.cpu_count(),
    }


def machine_load(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``settings.machine_load``: the load around each side (see ``run_side_once`` and ``run_side``)."""
    return {side: r["load"] for side, r in results.items()}


def versions(*packages: str) -> dict[str, str]:
    """The Python version and each package's ``__version__`` (e.g. ``versions("torch", "transformers")``)."""
    return {
        "python": platform.python_version(),
        **{name: str(importlib.import_module(name).__version__) for name in packages},
    }
