"""A real `mlflow models serve` of our pyfunc on 127.0.0.1 under concurrent good and bad requests: every bad row is
answered 4xx naming the row and the problem, never a 500, and the server keeps answering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.serving_load import BAD_KINDS, png, run_load, send
from tests.conftest import REPO
from tests.integration.servers import free_port, process

LOG_MODEL = "import sys; from pathlib import Path; from benchmarks.serving_load import log_model; " \
            "print(log_model(None, Path(sys.argv[1])))"  # fmt: skip


def test_served_model_answers_bad_rows_with_400_naming_them_under_load(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    # Logged in a process of its own: MLflow's active experiment and tracking URI are process-wide.
    logged = subprocess.run([sys.executable, "-c", LOG_MODEL, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    uri = logged.stdout.strip().splitlines()[-1]
    port = free_port()
    serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    url = f"http://127.0.0.1:{port}/invocations"
    with process(serve, tmp_path / "serve.log", tmp_path, env, f"http://127.0.0.1:{port}/ping", timeout=180):
        results = run_load(url, requests=60, concurrency=4, bad_share=0.5)
        # A whole column of numbers (pandas makes it int64, not object): refused too, naming the column.
        status, text, _ = send(url, {"dataframe_split": {"columns": ["image", "text"], "data": [[png((1, 2, 3)), 7]]}})
        odd = [send(url, {"dataframe_split": {"columns": ["image", "text"], "data": [[png((1, 2, 3)), "a"],
                                                                                      [png((1, 2, 3)), value]]}})
               for value in (None, ["a", "list"])]  # fmt: skip
        alive, _, _ = send(url, {"dataframe_split": {"columns": ["image", "text"], "data": [[png((9, 9, 9)), "a"]]}})
    assert results["server_errors"] == 0 and results["problems"] == [], results["problems"]
    assert set(results["kinds"]) == {"good", *BAD_KINDS}  # every kind of bad request was sent
    assert results["kinds"]["good"]["count"] > 10
    assert status == 400 and "text" in json.loads(text)["message"] and "Traceback" not in text, text
    for (code, answer, _), kind in zip(odd, ("null", "list"), strict=True):
        assert code == 400 and json.loads(answer)["message"] == f"row 1: `text` is not a string (it is {kind})"
    assert alive == 200  # and the server still answers
