"""Third-party backends: the ``pollserve.backends`` entry points and ``MODULE:CLASS``.

Packages are "installed" the way pip leaves them: a ``NAME-VERSION.dist-info``
folder with METADATA and entry_points.txt next to the modules, in a folder on
sys.path (for the registry in this process) or on PYTHONPATH (for the command).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from serverproc import run_pollserve

from pollserve.backends import (
    AUTO_PLUGINS_ENV,
    BACKENDS,
    BackendUnavailableError,
    PluginError,
    auto_backend,
    create_backend,
    get_backend,
    known_names,
    list_backends,
    plugins,
)
from pollserve.backends.select import SelectBackend

BACKENDS_MODULE = """
from pollserve.backends.poll import PollBackend


class Good(PollBackend):
    name = "good"


class Offered(PollBackend):
    name = "offered"
    auto_candidate = True


class Unavailable(PollBackend):
    name = "unavailable"
    auto_candidate = True

    @classmethod
    def is_available(cls):
        return False


class Misnamed(PollBackend):
    name = "something-else"


class Refused(PollBackend):
    # a backend whose system call the kernel or a sandbox refuses

    name = "refused"

    def __init__(self):
        raise PermissionError(1, "Operation not permitted: no /dev/thing in this container")


class Moody(PollBackend):
    name = "moody"

    @classmethod
    def is_available(cls):
        raise RuntimeError("cannot tell")


class NotABackend:
    name = "thing"
"""

BROKEN_MODULE = """
raise RuntimeError("boom\\nand a second line")
"""


def install(site: Path, package: str, entry_points: dict[str, str], modules: dict[str, str] | None = None) -> None:
    """What pip leaves behind for a package declaring these backends."""
    info = site / f"{package.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[pollserve.backends]\n{lines}")
    for name, source in (modules or {}).items():
        (site / f"{name}.py").write_text(source)
    importlib.invalidate_caches()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on sys.path for fake installed packages; the registry forgets its entry points
    before and after, and the modules imported from it are forgotten after."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv(AUTO_PLUGINS_ENV, raising=False)
    plugins.declared.cache_clear()
    yield folder
    plugins.declared.cache_clear()
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]


@pytest.fixture
def installed(site: Path) -> Path:
    """A good plugin, a broken one, one that is not a Backend, one misnamed, one whose
    is_available() raises, and one that declares a built-in name, each in a package of its own."""
    install(
        site,
        "good-pkg",
        {
            "good": "fake_backends:Good",
            "offered": "fake_backends:Offered",
            "unavailable": "fake_backends:Unavailable",
        },
        {"fake_backends": BACKENDS_MODULE},
    )
    install(site, "broken-pkg", {"broken": "broken_backend:Broken"}, {"broken_backend": BROKEN_MODULE})
    install(site, "odd-pkg", {"thing": "fake_backends:NotABackend", "misnamed": "fake_backends:Misnamed"})
    install(site, "moody-pkg", {"moody": "fake_backends:Moody"})
    install(site, "shadow-pkg", {"select": "shadow_backend:Shadow"}, {"shadow_backend": BROKEN_MODULE})
    return site


class TestLookup:
    def test_built_in_names_read_no_entry_points(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """``--backend epoll`` and ``auto`` start without reading the group, so no plugin can slow them."""

        def refuse(**kwargs):
            raise AssertionError("entry points read")

        monkeypatch.delenv(AUTO_PLUGINS_ENV, raising=False)
        monkeypatch.setattr(importlib.metadata, "entry_points", refuse)
        plugins.declared.cache_clear()
        try:
            assert get_backend("select") is SelectBackend
            create_backend("auto").close()
        finally:
            plugins.declared.cache_clear()

    def test_entry_points_are_read_once(self, installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        calls = []
        real = importlib.metadata.entry_points

        def counted(**kwargs):
            calls.append(kwargs)
            return real(**kwargs)

        monkeypatch.setattr(importlib.metadata, "entry_points", counted)
        get_backend("good")
        get_backend("good")
        known_names()
        list_backends()
        assert calls == [{"group": "pollserve.backends"}]

    def test_looking_one_up_imports_only_that_one(self, installed: Path) -> None:
        cls = get_backend("good")
        assert cls.__name__ == "Good" and cls.__module__ == "fake_backends"
        assert create_backend("good").name == "good"
        assert "broken_backend" not in sys.modules

    def test_module_class(self, installed: Path) -> None:
        assert get_backend("fake_backends:Good").__name__ == "Good"
        assert get_backend("fake_backends:Misnamed").name == "something-else"  # no entry point to agree with

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("no_such_module_xyz:Backend", "cannot import module 'no_such_module_xyz': ModuleNotFoundError: "),
            ("fake_backends:Missing", "module 'fake_backends' has no attribute 'Missing'"),
            ("fake_backends:NotABackend", "fake_backends:NotABackend is not a subclass of pollserve.backends.Backend"),
            ("broken_backend:Broken", "cannot import module 'broken_backend': RuntimeError: boom"),
            (":Good", "':Good' is not MODULE:CLASS"),
        ],
    )
    def test_module_class_that_cannot_be_used(self, installed: Path, spec: str, message: str) -> None:
        with pytest.raises(PluginError) as caught:
            get_backend(spec)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)

    @pytest.mark.parametrize(
        ("name", "message"),
        [
            (
                "broken",
                "backend plugin 'broken' (broken_backend:Broken) of package broken-pkg 1.0: "
                "cannot import module 'broken_backend': RuntimeError: boom",
            ),
            (
                "thing",
                "backend plugin 'thing' (fake_backends:NotABackend) of package odd-pkg 1.0: "
                "fake_backends:NotABackend is not a subclass of pollserve.backends.Backend",
            ),
            (
                "misnamed",
                "backend plugin 'misnamed' (fake_backends:Misnamed) of package odd-pkg 1.0: its class is named "
                "'something-else'; the entry point and the class's name attribute must agree",
            ),
            ("moody", "backend 'moody': is_available() failed: RuntimeError: cannot tell"),
        ],
    )
    def test_plugin_that_cannot_be_used_is_one_line(self, installed: Path, name: str, message: str) -> None:
        with pytest.raises(PluginError) as caught:
            get_backend(name)
        assert str(caught.value) == message

    def test_unavailable_plugin(self, installed: Path) -> None:
        with pytest.raises(BackendUnavailableError, match=r"^backend 'unavailable' is not available on this system"):
            get_backend("unavailable")

    def test_a_backend_whose_creation_fails_says_why(self, installed: Path) -> None:
        """is_available() is False for it, as for a missing primitive; the OSError is the user's to see."""
        with pytest.raises(BackendUnavailableError) as caught:
            get_backend("fake_backends:Refused")
        assert str(caught.value).startswith(
            "backend 'fake_backends:Refused' cannot be created here: "
            "PermissionError: [Errno 1] Operation not permitted: no /dev/thing in this container (available: "
        ), caught.value

    def test_unknown_name_lists_the_plugins_without_importing_them(self, installed: Path) -> None:
        with pytest.raises(BackendUnavailableError) as caught:
            get_backend("nope")
        known = ", ".join(["auto", *BACKENDS, "broken", "good", "misnamed", "moody", "offered", "thing", "unavailable"])
        assert str(caught.value) == f"unknown backend 'nope' (known: {known}; or MODULE:CLASS)"
        assert "broken_backend" not in sys.modules

    def test_a_built_in_name_means_the_built_in(self, installed: Path) -> None:
        """shadow-pkg declares "select": the built-in wins, listing says so, the plugin is not imported."""
        assert get_backend("select") is SelectBackend
        assert known_names().count("select") == 1
        rows, problems = list_backends()
        assert [row.origin for row in rows if row.name == "select"] == ["built-in"]
        assert (
            "backend plugin 'select' (shadow_backend:Shadow) of package shadow-pkg 1.0 is ignored: 'select' means "
            "the built-in backend (--backend shadow_backend:Shadow runs the plugin)"
        ) in problems
        assert "shadow_backend" not in sys.modules

    def test_a_name_two_packages_declare_is_refused(self, site: Path) -> None:
        install(site, "one-pkg", {"twice": "fake_backends:Good"}, {"fake_backends": BACKENDS_MODULE})
        install(site, "two-pkg", {"twice": "fake_backends:Offered"})
        with pytest.raises(PluginError) as caught:
            get_backend("twice")
        assert str(caught.value) == (
            "backend plugin 'twice' is declared by several packages (one-pkg 1.0: fake_backends:Good, "
            "two-pkg 1.0: fake_backends:Offered); name one as MODULE:CLASS"
        )
        rows, problems = list_backends()
        assert len(problems) == 2 and all("other packages declare 'twice' too" in line for line in problems)
        assert [(row.origin, row.available) for row in rows if row.name == "twice"] == [
            ("one-pkg 1.0", False),
            ("two-pkg 1.0", False),
        ]


class TestAuto:
    def test_installing_a_plugin_never_changes_auto(self, installed: Path) -> None:
        assert auto_backend() is BACKENDS[auto_backend().name]
        assert "fake_backends" not in sys.modules  # not even imported

    def test_the_user_opts_in_by_name(self, installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(AUTO_PLUGINS_ENV, "offered")
        assert auto_backend().name == "offered"
        assert get_backend("auto").name == "offered"

    def test_a_plugin_not_available_here_falls_through(self, installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(AUTO_PLUGINS_ENV, "unavailable, offered")
        assert auto_backend().name == "offered"
        monkeypatch.setenv(AUTO_PLUGINS_ENV, "unavailable")
        assert auto_backend().name in BACKENDS

    @pytest.mark.parametrize(
        ("names", "message"),
        [
            ("good", "POLLSERVE_AUTO_PLUGINS names 'good', which does not offer itself to auto; use it by name"),
            ("nope", "unknown backend 'nope'"),
            ("broken", "backend plugin 'broken'"),
        ],
    )
    def test_naming_what_cannot_be_picked_is_an_error(
        self, installed: Path, monkeypatch: pytest.MonkeyPatch, names: str, message: str
    ) -> None:
        monkeypatch.setenv(AUTO_PLUGINS_ENV, names)
        with pytest.raises(BackendUnavailableError) as caught:
            auto_backend()
        assert str(caught.value).startswith(message)


class TestListing:
    def test_every_plugin_with_its_origin(self, installed: Path) -> None:
        rows, problems = list_backends()
        assert [row.name for row in rows] == [
            *BACKENDS,
            "broken",
            "good",
            "misnamed",
            "moody",
            "offered",
            "thing",
            "unavailable",
        ]
        by_name = {row.name: row for row in rows}
        assert all(by_name[name].origin == "built-in" for name in BACKENDS)
        good = by_name["good"]
        assert (good.origin, good.backend.__name__, good.available) == ("good-pkg 1.0", "Good", True)
        assert by_name["unavailable"].backend is not None and not by_name["unavailable"].available
        for name in ("broken", "thing", "misnamed", "moody"):
            assert by_name[name].backend is None and not by_name[name].available
        assert len(problems) == 5  # broken, thing, misnamed, moody, and the one declaring "select"
        assert all("\n" not in line and "Traceback" not in line for line in problems)
        assert sum(line.startswith("backend plugin 'broken'") for line in problems) == 1


class TestCommand:
    """The pollserve command, with the packages on PYTHONPATH."""

    def test_backends_lists_plugins_and_reports_each_failure_in_one_line(self, installed: Path) -> None:
        result = run_pollserve("backends", env={"PYTHONPATH": str(installed)})
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["backend", "available", "capacity", "origin", "auto"]
        rows = {line.split()[0]: line for line in lines[1:]}
        assert rows["good"].split() == ["good", "yes", "unbounded", "good-pkg", "1.0"]
        assert rows["broken"].split() == ["broken", "no", "-", "broken-pkg", "1.0"]
        assert "built-in" in rows["select"].split()
        errors = result.stderr.splitlines()
        assert len(errors) == 5, result.stderr
        assert all(line.startswith("pollserve: backend plugin '") for line in errors), result.stderr
        assert "Traceback" not in result.stderr

    @pytest.mark.parametrize("spec", ["good", "fake_backends:Good"])
    def test_serves_on_a_plugin(self, installed: Path, start_server, spec: str) -> None:
        server = start_server("--backend", spec, env={"PYTHONPATH": str(installed)})
        assert server.backend == "good"

    @pytest.mark.parametrize(
        ("args", "env", "message"),
        [
            (["--backend", "broken"], {}, "pollserve: backend plugin 'broken' (broken_backend:Broken) of package "),
            (
                [],
                {"POLLSERVE_BACKEND": "broken"},
                "pollserve: POLLSERVE_BACKEND=broken: backend plugin 'broken' (broken_backend:Broken) of ",
            ),
            (["--backend", "nope_xyz:Backend"], {}, "pollserve: cannot import module 'nope_xyz': ModuleNotFound"),
            ([], {AUTO_PLUGINS_ENV: "good", "POLLSERVE_BACKEND": ""}, "pollserve: POLLSERVE_AUTO_PLUGINS names 'good'"),
        ],
    )
    def test_a_plugin_that_cannot_be_used_is_one_line_exit_2(
        self, installed: Path, args: list[str], env: dict[str, str], message: str
    ) -> None:
        result = run_pollserve(*args, "--port", "0", env={"PYTHONPATH": str(installed), **env})
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message), result.stderr

    def test_a_broken_plugin_says_nothing_when_not_asked_for(self, installed: Path) -> None:
        result = run_pollserve("--backend", "select", "--port", "70000", env={"PYTHONPATH": str(installed)})
        assert result.returncode == 2
        assert result.stderr.strip() == "pollserve: --port 70000 is out of range 0-65535"
