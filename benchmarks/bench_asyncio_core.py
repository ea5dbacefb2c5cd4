"""What the asyncio face's layering costs where no I/O is involved: callbacks, futures, tasks.

    python benchmarks/bench_asyncio_core.py                           # pure build (this checkout) only
    python benchmarks/bench_asyncio_core.py --compiled-root DIR   # and a compiled build (pip install --target DIR .)

Each loop runs each workload in a subprocess of its own, three reps interleaved; the figure is the
process's CPU time per operation (``time.process_time``), the median of the reps, and its ratios to
asyncio's own loop and to uvloop measured in the same run.  The workloads:

- ``call_soon``: 200,000 ``call_soon`` callbacks, then the run that runs them;
- ``future``: 100,000 round trips between two tasks through futures (``await fut``; the other side's
  ``set_result``): what every ``await`` on I/O costs in scheduling;
- ``sleep0``: one task awaiting ``asyncio.sleep(0)`` 100,000 times;
- ``timers``: 50,000 ``call_later`` timers, half of them cancelled, at spread deadlines.

On pollserve's loop a ``call_soon`` handle is queued as it is and made by compiled code (soon.py),
and a timer is a compiled object too, riding on an entry of the core's heap (soon.py's LaterHandle);
this table says what each costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKLOAD = r"""
import asyncio, sys, time
kind, workload = sys.argv[1], sys.argv[2]
if kind == "asyncio":
    loop = asyncio.new_event_loop()
elif kind == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
else:
    import pollserve.loops
    loop = pollserve.loops.epoll()

def call_soon():
    n = 200_000
    for _ in range(n):
        loop.call_soon(int)
    loop.call_soon(loop.stop)
    loop.run_forever()
    return n

async def ping_pong():
    n = 100_000
    box = [None]
    async def other(turns):
        for _ in range(turns):
            while box[0] is None:
                await asyncio.sleep(0)
            fut, box[0] = box[0], None
            fut.set_result(None)
    peer = asyncio.ensure_future(other(n))
    for _ in range(n):
        fut = loop.create_future()
        box[0] = fut
        await fut
    await peer
    return n

async def sleep0():
    n = 100_000
    for _ in range(n):
        await asyncio.sleep(0)
    return n

def timers():
    n = 50_000
    handles = [loop.call_later(0.001 * (i % 100), int) for i in range(n)]
    for handle in handles[::2]:
        handle.cancel()
    loop.call_later(0.11, loop.stop)
    loop.run_forever()
    return n

started = time.process_time()
if workload == "call_soon":
    n = call_soon()
elif workload == "future":
    n = loop.run_until_complete(ping_pong())
elif workload == "sleep0":
    n = loop.run_until_complete(sleep0())
else:
    n = timers()
print((time.process_time() - started) / n * 1e6)
loop.close()
"""

WORKLOADS = ("call_soon", "future", "sleep0", "timers")


def measure(kind: str, workload: str, root: Path | None) -> float:
    env = dict(os.environ)
    if root is not None:
        env["PYTHONPATH"] = str(root)
    done = subprocess.run(
        [sys.executable, "-c", WORKLOAD, kind, workload],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd="/",
    )
    return float(done.stdout.strip())


def build_of(root: Path | None) -> str:
    env = dict(os.environ, PYTHONPATH=str(root or REPO))
    code = "import pollserve.compiled as c; print(c.build())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/").stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compiled-root", type=Path, help="a folder holding the compiled build")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    kinds: dict[str, Path | None] = {"asyncio": None}
    try:
        import uvloop  # noqa: F401

        kinds["uvloop"] = None
    except ImportError:
        print("bench_asyncio_core: uvloop is not installed: left out", file=sys.stderr)
    kinds["pollserve, pure"] = REPO
    if args.compiled_root is not None:
        if build_of(args.compiled_root) != "compiled":
            sys.exit(f"bench_asyncio_core: {args.compiled_root} does not hold the compiled build")
        kinds["pollserve, compiled"] = args.compiled_root
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.reps):
        for workload in WORKLOADS:
            for name, root in kinds.items():
                kind = name.split(",")[0]
                results.setdefault((name, workload), []).append(measure(kind, workload, root))
    print("# The asyncio face's scheduling cost\n")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- machine: {platform.platform()}, {os.cpu_count()} logical CPUs")
    print(f"- python: {platform.python_implementation()} {platform.python_version()}")
    against = "asyncio's loop" + (" and to uvloop" if "uvloop" in kinds else "")
    print(f"- CPU us per operation, median of {args.reps} reps; (ratio to {against})\n")
    print("| loop | " + " | ".join(WORKLOADS) + " |")
    print("|---|" + "---|" * len(WORKLOADS))
    for name in kinds:
        cells = []
        for workload in WORKLOADS:
            mine = statistics.median(results[(name, workload)])
            bases = [statistics.median(results[(peer, workload)]) for peer in ("asyncio", "uvloop") if peer in kinds]
            cells.append(f"{mine:.2f} ({', '.join(f'{mine / base:.2f}' for base in bases)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
