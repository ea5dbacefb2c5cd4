"""The core loop's handler tables under random sequences: readers and writers added, replaced and
removed on real socketpairs, some of their fds past the dispatch's fd-indexed table (set low here),
handlers that remove or add others while the pass runs, fds made readable and drained, and single
passes of the loop.

The dispatch looks a handler up in a list indexed by fd, kept beside the dicts by add_reader() and the
others (``EventLoop._readers_by_fd``); an fd past its end is looked up in the dict.  Invariants after
every step: the tables say what the dicts say; a pass ran each handler registered for a ready fd
exactly once, and nothing else but what a handler of that pass added.
"""

from __future__ import annotations

import socket

import pytest

from pollserve.loop import EventLoop

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test  # noqa: E402

#: socketpairs per run; the upper half of their fds is past the table
PAIRS = 6

which = st.integers(min_value=0, max_value=PAIRS - 1)


class DispatchModel(RuleBasedStateMachine):
    def __init__(self, backend_name: str) -> None:
        super().__init__()
        self.loop = EventLoop(backend_name)
        self.pairs = [socket.socketpair() for _ in range(PAIRS)]
        for ours, peer in self.pairs:
            ours.setblocking(False)
            peer.setblocking(False)
        self.fds = [ours.fileno() for ours, _ in self.pairs]
        # The table holds the fds already registered (the loop's wakeup socket) and grows no further
        # than the middle of ours: the fds above it are the dict's.
        self.loop._fd_table_limit = sorted(self.fds)[PAIRS // 2]
        self.readers: dict[int, str] = {}  # pair index -> the tag its reader calls in with
        self.writers: dict[int, str] = {}
        self.readable = [False] * PAIRS
        self.calls: list[tuple[str, int, str]] = []
        self.tag_count = 0

    def new_tag(self) -> str:
        self.tag_count += 1
        return f"t{self.tag_count}"

    def handler(self, kind: str, index: int, tag: str, then=None):
        def called() -> None:
            self.calls.append((kind, index, tag))
            if then is not None:
                then()

        return called

    # -- registrations ---------------------------------------------------------------------------

    @rule(index=which)
    def add_reader(self, index: int) -> None:
        tag = self.new_tag()
        self.loop.add_reader(self.fds[index], self.handler("r", index, tag))
        self.readers[index] = tag

    @rule(index=which)
    def add_writer(self, index: int) -> None:
        tag = self.new_tag()
        self.loop.add_writer(self.fds[index], self.handler("w", index, tag))
        self.writers[index] = tag

    @rule(index=which)
    def remove_reader(self, index: int) -> None:
        assert self.loop.remove_reader(self.fds[index]) is (self.readers.pop(index, None) is not None)

    @rule(index=which)
    def remove_writer(self, index: int) -> None:
        assert self.loop.remove_writer(self.fds[index]) is (self.writers.pop(index, None) is not None)

    @rule(index=which, victim=which)
    def add_a_writer_that_removes_a_reader(self, index: int, victim: int) -> None:
        """Each of its calls removes another fd's reader (or its own fd's), if there is one: mid-pass, if
        that one's event comes later in the same pass, it must not run."""
        tag = self.new_tag()

        def remove() -> None:
            if self.loop.remove_reader(self.fds[victim]):
                self.removed_in_pass.add(("r", victim, self.readers.pop(victim)))

        self.loop.add_writer(self.fds[index], self.handler("w", index, tag, remove))
        self.writers[index] = tag

    @rule(index=which, other=which)
    def add_a_writer_that_adds_a_writer(self, index: int, other: int) -> None:
        """Its calls (re)place a writer on another fd, which may or may not run in the same pass."""
        tag = self.new_tag()

        def add() -> None:
            added = self.new_tag()
            self.loop.add_writer(self.fds[other], self.handler("w", other, added))
            old = self.writers.get(other)
            if old is not None:
                self.removed_in_pass.add(("w", other, old))
            self.writers[other] = added
            self.added_in_pass.add(("w", other, added))

        self.loop.add_writer(self.fds[index], self.handler("w", index, tag, add))
        self.writers[index] = tag

    # -- readiness and passes ------------------------------------------------------------------------

    @rule(index=which)
    def make_readable(self, index: int) -> None:
        self.pairs[index][1].send("é".encode())
        self.readable[index] = True

    @rule(index=which)
    def drain(self, index: int) -> None:
        ours = self.pairs[index][0]
        while True:
            try:
                if not ours.recv(4096):
                    break
            except BlockingIOError:
                break
        self.readable[index] = False

    @rule()
    def one_pass(self) -> None:
        """One pass of the loop (stop() queued first), every fd's handlers looked up as it runs.
        Each socket of a pair is writable throughout: its writer runs in every pass."""
        before = {("r", i, t) for i, t in self.readers.items() if self.readable[i]}
        before |= {("w", i, t) for i, t in self.writers.items()}
        self.removed_in_pass: set[tuple[str, int, str]] = set()
        self.added_in_pass: set[tuple[str, int, str]] = set()
        self.calls.clear()
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()
        ran = list(self.calls)
        assert len(ran) == len(set(ran)), f"a handler ran twice in one pass: {ran}"
        unexpected = set(ran) - before - self.added_in_pass
        assert not unexpected, f"handlers that were not registered ran: {unexpected}"
        # What was registered for a ready fd throughout the pass ran; one removed mid-pass may have
        # run before it was; one added mid-pass may run if its fd came later.
        missing = before - set(ran) - self.removed_in_pass
        assert not missing, f"handlers registered for a ready fd did not run: {missing}"

    # -- invariants ---------------------------------------------------------------------------------

    @invariant()
    def tables_match_the_dicts(self) -> None:
        loop = self.loop
        for table, handlers in ((loop._readers_by_fd, loop._readers), (loop._writers_by_fd, loop._writers)):
            for fd, callback in enumerate(table):
                assert callback is handlers.get(fd), f"fd {fd}: table {callback!r}, dict {handlers.get(fd)!r}"
            assert len(table) <= max(loop._fd_table_limit, loop._wakeup_recv.fileno() + 1)
        assert {fd for fd in loop._readers if fd != loop._wakeup_recv.fileno()} == {self.fds[i] for i in self.readers}
        assert set(loop._writers) == {self.fds[i] for i in self.writers}

    def teardown(self) -> None:
        self.loop.close()
        for ours, peer in self.pairs:
            ours.close()
            peer.close()


def test_model_of_handler_tables(backend_name: str) -> None:
    run_state_machine_as_test(
        lambda: DispatchModel(backend_name),
        settings=settings(max_examples=40, stateful_step_count=25, deadline=None),
    )


def test_a_handler_past_the_table_runs_and_is_removed(backend_name: str) -> None:
    """An fd past the table (its handlers in the dict only) is dispatched; once removed, not."""
    with EventLoop(backend_name) as loop:
        loop._fd_table_limit = 0  # nothing more goes into the tables
        ours, peer = socket.socketpair()  # after the loop's own sockets: past the table
        with ours, peer:
            fd = ours.fileno()
            ran: list[int] = []
            loop.add_reader(fd, lambda: ran.append(fd))
            assert fd >= len(loop._readers_by_fd)
            peer.send(b"\xff")
            loop.call_soon(loop.stop)
            loop.run_forever()
            assert ran == [fd]
            assert loop.remove_reader(fd)
            loop.call_soon(loop.stop)
            loop.run_forever()
            assert ran == [fd]
