"""A real, throwaway Postgres server for the test session (fixture ``postgres``): initdb and pg_ctl on a free
port in a temporary directory, one fresh database per test, stopped and deleted when the session ends.

The server binaries come from HISTOSEARCH_PG_BIN, else PATH, else Debian's /usr/lib/postgresql/<version>/bin
(scripts/install.sh installs the `postgresql` package). initdb refuses to run as root, so under root the
server runs as the `postgres` user that package creates. Without binaries the Postgres tests skip, saying so.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_USER = "postgres"  # the OS user the server runs as when the tests run as root
DB_USER = "histosearch"


def _bin_dir() -> Path | None:
    if os.environ.get("HISTOSEARCH_PG_BIN"):
        return Path(os.environ["HISTOSEARCH_PG_BIN"])
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return debian[-1].parent if debian else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="histosearch-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, SERVER_USER)
            self.root.chmod(0o700)
            self._prefix = ["runuser", "-u", SERVER_USER, "--"]
        self._names = itertools.count()

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._prefix, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr or done.stdout}")

    def start(self) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", DB_USER, "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")  # fmt: skip
        # Durability is not under test here: no fsync makes each commit cost microseconds.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={DB_USER} dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: `pip install .[postgres]` to run the Postgres tests")
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("no Postgres server binaries (pg_ctl): install Debian's `postgresql` or set HISTOSEARCH_PG_BIN")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb refuses to run as root")
    try:
        server = PostgresServer(bin_dir)
    except LookupError:
        pytest.skip(f"running as root without a `{SERVER_USER}` user to run the server: initdb refuses root")
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(server.root, ignore_errors=True)
        pytest.skip(f"could not start a Postgres server from {bin_dir}: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new empty database on each of the store's two backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'histosearch.db'}"
    # A server database keeps its vector segment files in the data dir of the settings.
    request.getfixturevalue("monkeypatch").setenv("HISTOSEARCH_DATA_DIR", str(tmp_path / "data"))
    return request.getfixturevalue("postgres").new_database()
