"""An aiohttp client on pollserve's loop: a ClientSession is made inside the coroutine the loop runs.

python aiohttp_client.py URL"""

import asyncio
import sys

import aiohttp

import pollserve


async def main(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        answer = await response.text()
    loop = asyncio.get_running_loop()
    return f"server: {answer}; client: {type(loop).__name__} {loop.backend.name}"


if __name__ == "__main__":
    print(pollserve.run(main(sys.argv[1])))
