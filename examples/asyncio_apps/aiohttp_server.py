"""An aiohttp server on pollserve's loop: ``web.run_app()`` runs on the loop it is given.

python aiohttp_server.py [PORT]"""

import asyncio
import sys

from aiohttp import web

import pollserve


async def where(request: web.Request) -> web.Response:
    loop = asyncio.get_running_loop()
    return web.Response(text=f"{type(loop).__name__} {loop.backend.name}")


app = web.Application()
app.router.add_get("/", where)

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8001
    web.run_app(app, host="127.0.0.1", port=port, loop=pollserve.new_event_loop())
