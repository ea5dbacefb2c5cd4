"""What every step of the lesson shares: the reply, the command line and the listening socket.

Each step changes only how clients are served; this module keeps the rest out of the way.
"""

from __future__ import annotations

import argparse
import socket

#: the classic lesson's reply, sent once for every chunk received
HELLO = b"Hello world\n"


def option_parser(description: str) -> argparse.ArgumentParser:
    """--host, --port and --repeat, the options of every step."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5001, help="TCP port; 0 lets the kernel pick one (default 5001)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="send HELLO this many times in each reply: 87382 makes a 1 MB reply (default 1)",
    )
    return parser


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; says where it listens, as the runner and a learner need to know."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Without it a restarted server cannot bind the port for a minute (TIME_WAIT, tcp(7)).
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    bound_host, bound_port = server.getsockname()
    print(f"listening on {bound_host}:{bound_port}", flush=True)
    return server
