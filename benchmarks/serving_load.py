"""A bounded load test of `mlflow models serve` on 127.0.0.1: good and bad requests, concurrently.

    python -m benchmarks.serving_load [--requests 300] [--concurrency 4] [--bad-share 0.3] [--weights W]

Logs a retrieval model as our pyfunc (random tiny weights, or `--weights`: our .safetensors of any task's model
that holds a retrieval head, e.g. models/retrieval.safetensors) into a temporary MLflow store, serves it with
`mlflow models serve --env-manager local`, and sends `--requests` requests from `--concurrency` threads: good ones
(1 to 8 rows of image + text) and bad ones of each kind (a row whose image is not base64, not an image, an int; a
text that is a number; a missing column). Records each answer's status and latency; prints p50/p95 per kind,
throughput (requests/s, rows/s) and the count of server errors (5xx or a dropped connection), which must be 0;
writes benchmarks/results/serving_load.json. Exits 1 when a good request is not answered 200, a bad one not 4xx
naming its row (or, for the missing column, the column), or the server erred.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

RESULTS = Path(__file__).parent / "results"
BAD_KINDS = ("not_base64", "not_an_image", "image_not_string", "text_not_string", "missing_column")


def png(colour: tuple[int, int, int], size: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_request(kind: str, rng: random.Random) -> tuple[dict, int, str]:
    """(body, rows, what the answer must say): a good request of 1-8 rows, or a bad one with its bad row last."""
    rows = rng.randint(1, 8)
    data = [[png((rng.randrange(256), 40, 200)), rng.choice(["a red circle", "two blue squares", "a cat"])]
            for _ in range(rows)]  # fmt: skip
    bad = rows - 1
    expect = ""
    if kind == "not_base64":
        data[bad][0], expect = "not base64!", f"row {bad}: `image` is not a base64-encoded image (not base64"
    elif kind == "not_an_image":
        data[bad][0] = base64.b64encode(b"plain text, not an image").decode()
        expect = f"row {bad}: `image` is not a base64-encoded image (base64, but not an image"
    elif kind == "image_not_string":
        data[bad][0], expect = 7, f"row {bad}: `image` is not a base64-encoded image (it is int)"
    elif kind == "text_not_string":
        data[bad][1], expect = 3.5, f"row {bad}: `text` is not a string (it is float)"
    elif kind == "missing_column":
        return {"dataframe_split": {"columns": ["image"], "data": [[r[0]] for r in data]}}, rows, "['text']"
    return {"dataframe_split": {"columns": ["image", "text"], "data": data}}, rows, expect


def send(url: str, body: dict) -> tuple[int, str, float]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    except OSError as exc:  # refused or dropped: the server is down or died
        status, text = 0, repr(exc)
    return status, text, time.perf_counter() - start


def check(kind: str, status: int, text: str, expect: str) -> str | None:
    """What is wrong with an answer, or None."""
    if kind == "good":
        return None if status == 200 and len(json.loads(text)["predictions"]) > 0 else f"{status}: {text[:200]}"
    if not 400 <= status < 500:
        return f"{kind}: status {status}: {text[:200]}"
    message = json.loads(text).get("message", "")
    return None if expect in message and "Traceback" not in text else f"{kind}: {message[:200]!r} lacks {expect!r}"


def run_load(url: str, requests: int, concurrency: int, bad_share: float, seed: int = 0) -> dict:
    """Send the requests; per kind latencies, the problems seen, throughput."""
    rng = random.Random(seed)
    plan = []
    for i in range(requests):
        kind = BAD_KINDS[i % len(BAD_KINDS)] if rng.random() < bad_share else "good"
        plan.append((kind, *make_request(kind, rng)))

    def one(item: tuple[str, dict, int, str]) -> tuple[str, int, int, float, str | None]:
        kind, body, rows, expect = item
        status, text, seconds = send(url, body)
        return kind, rows, status, seconds, check(kind, status, text, expect)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, plan))
    wall = time.perf_counter() - start
    out: dict = {"requests": requests, "concurrency": concurrency, "wall_s": wall,
                 "requests_per_s": requests / wall, "server_errors": sum(a[2] == 0 or a[2] >= 500 for a in answers),
                 "problems": [a[4] for a in answers if a[4]], "kinds": {}}  # fmt: skip
    good = [a for a in answers if a[0] == "good"]
    out["good_rows_per_s"] = sum(a[1] for a in good) / wall
    for kind in ("good", *BAD_KINDS):
        seconds = sorted(a[3] for a in answers if a[0] == kind)
        if seconds:
            out["kinds"][kind] = {"count": len(seconds), "p50_ms": 1e3 * statistics.median(seconds),
                                  "p95_ms": 1e3 * seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))]}  # fmt: skip
    return out


def log_model(weights: Path | None, folder: Path) -> str:
    """A retrieval pyfunc logged into an MLflow store under `folder`; its model URI."""
    import mlflow
    import torch

    from benchmarks.vs_transformers import model_config
    from blip.data.tokenizer import load_tokenizer
    from blip.models.checkpoint import save_weights
    from blip.models.factory import build_model
    from blip.serving import log_pyfunc

    if weights is None:
        torch.manual_seed(0)
        model = build_model("retrieval", model_config("tiny"), load_tokenizer(), queue_size=16)
        weights = save_weights(model, folder / "retrieval.safetensors", "bert-base-uncased-offline")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")  # this process's MLflow state: call it in its own
    with mlflow.start_run(experiment_id=mlflow.set_experiment("serving-load").experiment_id):
        return log_pyfunc("retrieval", weights, max_length=35).model_uri


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bad-share", type=float, default=0.3)
    parser.add_argument("--weights", type=Path, help="our retrieval .safetensors (default: random tiny weights)")
    args = parser.parse_args()
    from tests.integration.servers import free_port, process

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        uri = log_model(args.weights, folder)
        port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
        serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                 "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        with process(serve, folder / "serve.log", folder, env, f"http://127.0.0.1:{port}/ping", timeout=180):
            results = run_load(f"http://127.0.0.1:{port}/invocations", args.requests, args.concurrency, args.bad_share)
    print(f"{args.requests} requests, {args.concurrency} concurrent: {results['requests_per_s']:.1f} requests/s, "
          f"{results['good_rows_per_s']:.1f} good rows/s, {results['server_errors']} server errors, "
          f"{len(results['problems'])} wrong answers")  # fmt: skip
    for kind, row in results["kinds"].items():
        print(f"  {kind:<17} {row['count']:>4} requests  p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms")
    for problem in results["problems"][:10]:
        print("  wrong:", problem)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving_load.json").write_text(json.dumps(results, indent=2))
    return 1 if results["server_errors"] or results["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
