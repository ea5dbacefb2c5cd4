"""hypercorn takes no loop factory: its ``serve()`` is a coroutine, run here on pollserve's loop.

python hypercorn_server.py [PORT]"""

import asyncio
import signal
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config
from where import app

import pollserve


async def main(port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await serve(app, config, shutdown_trigger=stop.wait)


if __name__ == "__main__":
    pollserve.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8002))
