"""pollserve's backend tests, shipped as a kit for people who write backends.

The same tests pollserve's own backends pass: the backend contract
(``contract.BackendContract``), then the event loop and the server running on
the backend (``end_to_end.LoopContract``, ``end_to_end.ServerContract``);
``suite.BackendSuite`` is all three.  They need pytest (``pip install
'pollserve[testing]'``); nothing here is imported by pollserve itself.

Run them on a backend from the command line::

    python -m pollserve.testing mypackage.module:MyBackend [PYTEST ARGS...]

or pull them into your own suite::

    import pytest
    from pollserve.testing.suite import BackendSuite

    class TestMyBackend(BackendSuite):
        @pytest.fixture
        def backend_class(self):
            return MyBackend

docs/backends.md is the contract these tests check.
"""
