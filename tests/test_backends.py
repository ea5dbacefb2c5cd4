"""Backend conformance: the pollserve.testing kit, run over every backend this OS has.

The contract itself lives in pollserve/testing (the kit third-party backends
run too), so the built-ins cannot pass a suite other than the one published.
What is specific to a built-in (its outcome where the contract allows several,
select's FD_SETSIZE, the registry) is tested here, on top.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

import pytest
from conftest import EMULATED
from serverproc import pollserve_env

from pollserve.backends import (
    BACKENDS,
    READ,
    WRITE,
    Backend,
    BackendUnavailableError,
    CapacityError,
    auto_backend,
    available_backends,
    create_backend,
    get_backend,
)
from pollserve.backends.select import FD_SETSIZE, SelectBackend
from pollserve.testing.contract import (
    CapacityContract,
    HangUpContract,
    KitFixtures,
    ReadinessContract,
    RegistrationContract,
    TimeoutContract,
    high_fd,
    ready,
)
from pollserve.testing.end_to_end import LoopContract, ServerContract


@pytest.fixture
def backend_class(backend_name: str) -> type[Backend]:
    """What the kit tests: each built-in available here, narrowed by POLLSERVE_BACKEND (conftest)."""
    return get_backend(backend_name)


class TestRegistration(RegistrationContract):
    pass


class TestReadiness(ReadinessContract):
    pass


class TestHangUpAndErrors(HangUpContract):
    def test_registered_fd_closed_without_unregister(self, backend: Backend, pair) -> None:
        """Which of the outcomes the contract allows each built-in has.

        select(2) fails the whole call with EBADF, poll(2) and /dev/poll report POLLNVAL: both
        become readiness of what was registered, so the handler's own recv() meets EBADF.  epoll
        and kqueue drop a closed fd from their interest lists, so it is never reported again.
        """
        a, b = pair
        victim, peer = socket.socketpair()
        fd = victim.fileno()
        backend.register(fd, READ | WRITE)
        backend.register(a.fileno(), READ)
        backend.poll(0)  # kqueue hands its registrations to the kernel here
        b.send(b"x")
        victim.close()
        try:
            result = ready(backend, 5)
            assert result.get(a.fileno()) == READ
            if backend.name in ("epoll", "kqueue"):
                assert fd not in result
            else:
                assert result.get(fd) == READ | WRITE
            backend.unregister(fd)  # late, but still accepted
            after = ready(backend, 0)
            if backend.name == "kqueue" and not after:  # the failed EV_DELETE came back alone
                after = ready(backend, 0)
            assert after == {a.fileno(): READ}
        finally:
            peer.close()


class TestTimeouts(TimeoutContract):
    pass


class TestCapacity(CapacityContract):
    def test_select_refuses_fds_beyond_fd_setsize(self, pair) -> None:
        if sys.platform == "win32":
            pytest.skip("Windows select limits the count of sockets, not fd numbers")
        backend = create_backend("select")
        fd = high_fd(pair[0], FD_SETSIZE)
        try:
            with pytest.raises(CapacityError) as caught:
                backend.register(fd, READ)
            message = str(caught.value)
            assert "select" in message and str(FD_SETSIZE) in message and "poll" in message
            assert len(backend) == 0
            backend.register(pair[0].fileno(), READ)  # a low fd still works
        finally:
            os.close(fd)
            backend.close()


class TestRegularFiles(KitFixtures):
    def test_regular_file(self, backend: Backend, tmp_path) -> None:
        """epoll_ctl(2): EPERM "The target file fd does not support epoll" (a regular file);
        poll(2) and select(2) report regular files as always ready."""
        if backend.name not in ("epoll", "poll", "select"):
            pytest.skip(f"{backend.name}: regular-file semantics differ and are not asserted")
        with open(tmp_path / "file", "wb") as file:
            if backend.name == "epoll":
                with pytest.raises(PermissionError):
                    backend.register(file.fileno(), READ)
                assert len(backend) == 0 and backend.interest(file.fileno()) == 0
            else:
                backend.register(file.fileno(), READ | WRITE)
                assert ready(backend) == {file.fileno(): READ | WRITE}


class TestLoopOnBackend(LoopContract):
    pass


class TestServerOnBackend(ServerContract):
    @pytest.fixture
    def command_env(self) -> dict[str, str]:
        """This source tree, and the EMULATION the tox env asks for (tests/serverproc.py)."""
        return pollserve_env()


class TestRegistry:
    def test_a_backend_that_cannot_be_created_is_unavailable(self) -> None:
        """bpo-41182: the function may exist while the system call fails (ENOSYS in a sandbox)."""

        class Refused(SelectBackend):
            name = "refused"

            def __init__(self) -> None:
                raise OSError(errno.ENOSYS, "Function not implemented")

        assert SelectBackend.is_available() is True
        assert Refused.is_available() is False

    def test_auto_order(self) -> None:
        assert list(BACKENDS) == ["epoll", "kqueue", "devpoll", "poll", "select"]
        names = available_backends()
        assert names == [name for name in BACKENDS if name in names]
        assert auto_backend().name == names[0]
        assert "select" in names  # every OS has select

    def test_expected_backends_for_this_os(self) -> None:
        names = set(available_backends()) - set(EMULATED)
        if sys.platform.startswith("linux"):
            assert {"epoll", "poll", "select"} <= names and "kqueue" not in names
        elif sys.platform == "darwin" or "bsd" in sys.platform:
            assert {"kqueue", "poll", "select"} <= names and "epoll" not in names
        elif sys.platform == "win32":
            assert names == {"select"}

    def test_lookup_by_name(self) -> None:
        for name in available_backends():
            assert get_backend(name).name == name
        assert get_backend("auto") is auto_backend()

    def test_unknown_name(self) -> None:
        with pytest.raises(BackendUnavailableError, match=r"unknown backend 'nope'.*known: auto, epoll"):
            get_backend("nope")

    def test_missing_backend_names_the_available_ones(self) -> None:
        missing = [name for name in BACKENDS if name not in available_backends()]
        if not missing:
            pytest.skip("every backend is available here")
        with pytest.raises(BackendUnavailableError) as caught:
            get_backend(missing[0])
        assert str(caught.value) == (
            f"backend {missing[0]!r} is not available on this system (available: {', '.join(available_backends())})"
        )
