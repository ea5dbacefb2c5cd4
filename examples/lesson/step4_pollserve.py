"""Step 4: the same hello app on pollserve, as a Protocol.

The app is left with what is the app's: what to answer to a chunk.  The rest
of step 3 is pollserve's job, each part a piece of its code:

- the loop and its backend: select, poll, epoll, kqueue or devpoll, chosen for
  the OS or forced with --backend (pollserve/loop.py, pollserve/backends/);
- write() never blocks: it sends what the kernel takes now and buffers the
  rest, watching for WRITE only while something is buffered; past 64 KiB
  buffered it stops reading from that client (pollserve/server.py);
- limits: a client whose fd select() cannot watch, or one past the fd budget,
  is refused with a log line while the others are served (pollserve/limits.py);
- SIGTERM stops accepting, flushes what is buffered, closes and exits 0
  (pollserve/service.py).

Every option after --repeat is pollserve's own:

    python examples/lesson/step4_pollserve.py --port 5001 --backend select
"""

from __future__ import annotations

import sys

from shared import HELLO, option_parser

from pollserve import Protocol
from pollserve.cli import main as pollserve_main


class Hello(Protocol):
    """One reply for every chunk received, as in steps 1-3; no socket, no loop, no select()."""

    reply = HELLO

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.reply)


def main() -> int:
    options, pollserve_options = option_parser(__doc__).parse_known_args()
    Hello.reply = HELLO * options.repeat  # set once, before the server makes its first Hello
    app = f"{__name__}:Hello"  # pollserve imports the app by name: this very module
    return pollserve_main(["--host", options.host, "--port", str(options.port), "--app", app, *pollserve_options])


if __name__ == "__main__":
    sys.exit(main())
