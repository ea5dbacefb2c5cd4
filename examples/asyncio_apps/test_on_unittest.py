"""An IsolatedAsyncioTestCase on pollserve's loop: ``loop_factory`` on Python 3.13+; before 3.13 an event
loop policy, asyncio's default one but for its new loops, which are pollserve's, set for the class's
tests only.  From 3.13 the policy is neither defined nor set (3.14 deprecates policies)."""

import asyncio
import sys
import unittest

import pollserve

if sys.version_info < (3, 13):  # IsolatedAsyncioTestCase makes its loop with asyncio.new_event_loop()

    class PollservePolicy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self):
            return pollserve.new_event_loop()


class OnPollserve(unittest.IsolatedAsyncioTestCase):
    loop_factory = pollserve.new_event_loop  # Python 3.13+

    if sys.version_info < (3, 13):

        @classmethod
        def setUpClass(cls):
            super().setUpClass()
            asyncio.set_event_loop_policy(PollservePolicy())

        @classmethod
        def tearDownClass(cls):
            asyncio.set_event_loop_policy(None)
            super().tearDownClass()

    async def test_runs_on_pollserve(self):
        loop = asyncio.get_running_loop()
        self.assertEqual(type(loop).__name__, "AsyncioLoop")
        print(f"on {type(loop).__name__} {loop.backend.name}", file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
