"""An IsolatedAsyncioTestCase on pollserve's loop: ``loop_factory`` on Python 3.13+, an event loop
policy before (asyncio's default one, whose new loops are pollserve's)."""

import asyncio
import sys
import unittest

import pollserve


class PollservePolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return pollserve.new_event_loop()


class OnPollserve(unittest.IsolatedAsyncioTestCase):
    loop_factory = pollserve.new_event_loop  # Python 3.13+

    if sys.version_info < (3, 13):

        @classmethod
        def setUpClass(cls):
            asyncio.set_event_loop_policy(PollservePolicy())

        @classmethod
        def tearDownClass(cls):
            asyncio.set_event_loop_policy(None)

    async def test_runs_on_pollserve(self):
        loop = asyncio.get_running_loop()
        self.assertEqual(type(loop).__name__, "AsyncioLoop")
        print(f"on {type(loop).__name__} {loop.backend.name}", file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
