"""granian on pollserve's loop, through a private door: granian's ``--loop`` and ``Granian(loop=)`` take
a name from a closed list (auto, asyncio, rloop, uvloop, winloop), and each worker builds its loop with
the builder registered under that name in ``granian._loops``, a private module.  Registering pollserve's
loop under "asyncio" at import makes the workers use it, whether they are forked or spawned (a spawned
worker imports this module again).  Tested with granian 2.8; a private name can change in any release.

python granian_server.py [PORT]"""

import asyncio
import sys

from granian import Granian
from granian._loops import loops
from granian.constants import Interfaces

import pollserve


@loops.register("asyncio")
def build_pollserve_loop() -> asyncio.AbstractEventLoop:
    loop = pollserve.new_event_loop()
    asyncio.set_event_loop(loop)  # as granian's own builders do
    return loop


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8004
    server = Granian("where:app", address="127.0.0.1", port=port, interface=Interfaces.ASGI, loop="asyncio")
    server.serve()
