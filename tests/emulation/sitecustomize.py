"""Test subprocesses start with this folder on PYTHONPATH only when an EMULATION is asked for."""

import emulate

emulate.install_from_env()
