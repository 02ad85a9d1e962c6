"""Start the receiver and the baseline under identical gunicorn settings; read their workers."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests import servers as shared

from .load import BenchError

ROOT = shared.ROOT
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks of the machine so far, from ``/proc/stat``: the share
    stolen by the hypervisor over a run says how much of the machine others took."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields), fields[7]


@dataclass
class Server:
    """One gunicorn master serving ``app`` on 127.0.0.1:``port``.

    Started like every test server (``tests/servers.py``): the repository's
    ``gunicorn.conf.py``, then the bench's extra arguments, with this process's
    environment (``WEB_CONCURRENCY``, ``WEB_THREADS`` and ``IDEMHOOK_POOL_SIZE``
    included: they are the bench's knobs too).
    """

    name: str
    app: str
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=shared.free_port)
    gunicorn: shared.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def workers(self) -> int:
        """How many workers gunicorn runs (once it has started)."""
        if self.gunicorn is None:
            raise BenchError(f"{self.name} has not been started")
        return self.gunicorn.workers

    def start(self, gunicorn_args: list[str]) -> None:
        self.gunicorn = shared.start_gunicorn(
            self.app,
            state=Path(tempfile.mkdtemp(prefix=f"idemhook-bench-{self.name}-")),
            env={**os.environ, **self.env},
            args=gunicorn_args,
            port=self.port,
            log_path=self.log,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until /healthz answers and every worker has loaded the app."""
        if self.gunicorn is None:
            raise BenchError(f"{self.name} has not been started")
        try:
            self.gunicorn.wait_ready(timeout)
        except shared.ServerError:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise BenchError(f"{self.name} did not start within {timeout:.0f}s:\n{tail}") from None

    def worker_pids(self) -> list[int]:
        return self.gunicorn.worker_pids() if self.gunicorn is not None else []

    def cpu_seconds(self, extra_pids: Sequence[int] = (), *, workers: bool = True) -> float:
        """User+system CPU used so far by the workers (unless ``workers`` is false) and
        ``extra_pids``, in seconds."""
        total = 0
        for pid in [*(self.worker_pids() if workers else ()), *extra_pids]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / CLK_TCK

    def switches(self) -> int:
        """Context switches so far of every thread of the workers (voluntary or not)."""
        total = 0
        for pid in self.worker_pids():
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    status = (task / "status").read_text()
                except OSError:
                    continue  # a thread that ended
                for line in status.splitlines():
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt")):
                        total += int(line.split()[1])
        return total

    def rss_mb(self) -> list[float]:
        """Resident memory of each worker, in MB."""
        sizes = []
        for pid in self.worker_pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        return sizes

    def stop(self) -> None:
        if self.gunicorn is None:
            return
        self.gunicorn.stop()
        if self.gunicorn.state is not None:
            shutil.rmtree(self.gunicorn.state, ignore_errors=True)
