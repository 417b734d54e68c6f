"""Real Prefect and MLflow servers (and a Prefect worker) on 127.0.0.1 for the end-to-end tests; every process
is started in its own session and its whole group is stopped on exit."""

from __future__ import annotations

import json
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


def wait_for_worker(api_url: str, pool: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until a worker of `pool` is online; `proc` (which starts it) must not exit first."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{api_url}/work_pools/{pool}/workers/filter", b"{}",
                                     {"Content-Type": "application/json"})  # fmt: skip
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                if any(worker["status"] == "ONLINE" for worker in json.loads(response.read())):
                    return
        except OSError:
            pass  # the pool does not exist yet
        time.sleep(1)
    raise RuntimeError(f"no {pool} worker online in {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def orchestration(project: Path, env: dict[str, str], logs: Path) -> Iterator[dict[str, str]]:
    """An MLflow tracking server, then the project's own `make prefect-server` and `make deploy` (the work pools,
    every deployment of prefect.yaml and a `cpu` worker), as flows/README.md has them; yields the environment that
    points clients at them. Prefect keeps its state where the Makefile puts it, in the project's .cache."""
    venv = Path(sys.executable).parent.parent
    mlflow_port, prefect_port = free_port(), free_port()
    env = {
        **env,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_HOME": str(logs / "prefect-home"),  # this test's own CLI calls; `make` sets the project's
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    # This test's environment is the project's: `-o` takes its install stamp as up to date, so make installs nothing.
    make = ["make", "-o", str(venv / ".installed"), f"VENV={venv}", f"PREFECT_PORT={prefect_port}"]
    with ExitStack() as stack:
        stack.enter_context(process(
            [f"{venv}/bin/mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{logs / 'mlflow.db'}", "--artifacts-destination",
             str(logs / "mlartifacts")],
            logs / "mlflow.log", logs, env, f"http://127.0.0.1:{mlflow_port}/health",
        ))  # fmt: skip
        stack.enter_context(process([*make, "prefect-server"], logs / "prefect-server.log", project, env,
                                    f"http://127.0.0.1:{prefect_port}/api/health"))  # fmt: skip
        deploy = stack.enter_context(process([*make, "deploy"], logs / "deploy.log", project, env))
        wait_for_worker(env["PREFECT_API_URL"], "cpu", deploy, logs / "deploy.log")
        yield env
