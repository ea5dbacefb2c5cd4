"""docs/dashboard-uvicorn.png: the live dashboard of a uvicorn process on pollserve's loop, under load.

    python benchmarks/dashboard_uvicorn.py                      # writes docs/dashboard-uvicorn.png
    python benchmarks/dashboard_uvicorn.py --out /tmp/shot.png --seconds 8

uvicorn serves a tiny ASGI app with ``--loop pollserve:new_event_loop`` and ``POLLSERVE_STATS_PORT=0``,
no stats code in the app: the endpoint's address is read from the line the loop writes.  Keep-alive
HTTP clients join it one every half second, each sending requests back to back, for ``--seconds``
(at most 20) while headless Chromium (tests/browser.py's DevTools client) watches the dashboard in real
time, then captures it at 1280x900.  Needs uvicorn and Debian's chromium; every process it starts is
stopped by its PID.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser import DevTools, find_chromium, png_size  # noqa: E402

APP = """
async def app(scope, receive, send):
    body = b"hello from pollserve's loop\\n"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
"""

STATS_LINE = re.compile(r"stats for pid \d+ on (http://\S+/)")
LIVE = "document.getElementById('state').className === 'live'"
#: the most a run may take, whatever --seconds says
MOST_SECONDS = 20.0
#: the most requests one client sends
MOST_REQUESTS = 200_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_uvicorn(folder: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    """uvicorn on 127.0.0.1:port, and its stats endpoint's URL, read from its output."""
    (folder / "hello_app.py").write_text(APP)
    env = dict(os.environ, POLLSERVE_STATS_PORT="0", POLLSERVE_STATS_HOST="127.0.0.1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(folder), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "uvicorn", "--loop", "pollserve:new_event_loop", "--lifespan", "off"]
    argv += ["--no-access-log", "--host", "127.0.0.1", "--port", str(port), "hello_app:app"]
    server = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None
    deadline = time.monotonic() + 30
    for line in server.stdout:
        sys.stderr.write(line)
        found = STATS_LINE.search(line)
        if found:
            threading.Thread(target=server.stdout.read, daemon=True).start()  # drained from here on
            return server, found[1]
        if time.monotonic() > deadline:
            break
    stop(server)
    raise SystemExit("uvicorn wrote no stats line: is POLLSERVE_STATS_PORT supported by this pollserve?")


def client(port: int, until: float, counts: list[int], index: int) -> None:
    """One keep-alive connection, requests back to back until ``until`` or MOST_REQUESTS."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        while time.monotonic() < until and counts[index] < MOST_REQUESTS:
            connection.request("GET", "/")
            connection.getresponse().read()
            counts[index] += 1
    except OSError as exc:
        print(f"client {index}: {exc}", file=sys.stderr)
    finally:
        connection.close()


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard-uvicorn.png")
    parser.add_argument("--seconds", type=float, default=12.0, help=f"of load (at most {MOST_SECONDS:g})")
    parser.add_argument("--clients", type=int, default=12)
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no headless Chromium here (apt-get install chromium)")
    seconds = min(args.seconds, MOST_SECONDS)
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        server, stats_url = start_uvicorn(Path(folder), port)
        clients: list[threading.Thread] = []
        counts = [0] * args.clients
        try:
            with DevTools(chromium, Path(folder) / "profile", (1280, 900)) as browser:
                browser.open(stats_url)
                browser.wait_until(LIVE, what="the page live")
                until = time.monotonic() + seconds
                for index in range(args.clients):
                    thread = threading.Thread(target=client, args=(port, until, counts, index), daemon=True)
                    thread.start()
                    clients.append(thread)
                    time.sleep(min(0.5, seconds / (2 * args.clients)))
                time.sleep(max(0.0, until - time.monotonic() - 1.0))  # the charts fill; captured under load
                browser.screenshot(args.out)
            for thread in clients:
                thread.join(timeout=15)
        finally:
            stop(server)
    width, height = png_size(args.out)
    print(f"{args.out}: {width}x{height}, {sum(counts):,} requests from {args.clients} clients")
    return 0


if __name__ == "__main__":
    sys.exit(main())
