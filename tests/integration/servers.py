"""Real Prefect and MLflow servers (and a Prefect worker) on 127.0.0.1 for the end-to-end tests; every process
is started in its own session and its whole group is stopped on exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(args: list[str], log: Path, cwd: Path, env: dict[str, str], ready_url: str | None = None,
            timeout: float = 120) -> Iterator[subprocess.Popen]:  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while ready_url:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ready_url} not up in {timeout} s:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@contextmanager
def orchestration(project: Path, env: dict[str, str], logs: Path) -> Iterator[dict[str, str]]:
    """An MLflow tracking server, a Prefect server and a `cpu` process worker for `project`; yields the
    environment that points clients at them."""
    bindir = str(Path(sys.executable).parent)
    mlflow_port, prefect_port = free_port(), free_port()
    env = {
        **env,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_HOME": str(logs / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{logs / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "BLIP_PROJECT_DIR": str(project),
        "PYTHONUNBUFFERED": "1",
    }
    with ExitStack() as stack:
        stack.enter_context(process(
            [f"{bindir}/mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{logs / 'mlflow.db'}", "--artifacts-destination",
             str(logs / "mlartifacts")],
            logs / "mlflow.log", logs, env, f"http://127.0.0.1:{mlflow_port}/health",
        ))  # fmt: skip
        stack.enter_context(process(
            [f"{bindir}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            logs / "prefect-server.log", logs, env, f"http://127.0.0.1:{prefect_port}/api/health",
        ))  # fmt: skip
        subprocess.run([f"{bindir}/prefect", "work-pool", "create", "cpu", "--type", "process"], cwd=project, env=env,
                       check=True, capture_output=True)  # fmt: skip
        stack.enter_context(process([f"{bindir}/prefect", "worker", "start", "--pool", "cpu", "--type", "process"],
                                    logs / "worker.log", project, env))  # fmt: skip
        yield env
