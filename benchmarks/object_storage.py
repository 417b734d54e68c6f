"""Web-scale data paths: ingest throughput per worker count, and the training loader reading the same shards from
local disk and from an S3 server on 127.0.0.1 (moto's, the one the tests use).

    python -m benchmarks.object_storage [--samples 10000] [--workers 1 2] [--loader-workers 1 2]

The shards are img2dataset's layout (`<key>.jpg` 384-px JPEG with photo-like noise, `<key>.txt`, `<key>.json`),
1,000 samples each. Ingest converts them (`format: webdataset`: decode, check, keep or re-encode, clean captions)
into our shards; the loader streams them straight (the pretraining input pipeline at base size, 224 px,
configs/base.yaml's augmentation). Writes benchmarks/results/object_storage.json.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import socket
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import webdataset as wds
import yaml
from PIL import Image

from benchmarks.data_and_capfilt import RESULTS, loader_rate
from benchmarks.vs_transformers import ROOT
from blip.config import load_params
from blip.data.ingest import ingest
from blip.data.scene import render, sample_scene


def img2dataset_shards(folder: Path, samples: int, per_shard: int = 1000) -> list[Path]:
    rng, noise = random.Random(0), np.random.default_rng(0)
    paths = []
    for first in range(0, samples, per_shard):
        paths.append(folder / f"{first // per_shard:05d}.tar")
        with wds.TarWriter(str(paths[-1])) as tar:
            for i in range(first, min(first + per_shard, samples)):
                pixels = np.asarray(render(sample_scene(rng, 3), 384), dtype=np.int16)
                pixels = np.clip(pixels + noise.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
                jpg = io.BytesIO()
                Image.fromarray(pixels).save(jpg, format="JPEG", quality=90)
                tar.write({"__key__": f"{i:09d}", "jpg": jpg.getvalue(), "txt": "A scene of shapes.",
                           "json": {"key": f"{i:09d}", "status": "success"}})  # fmt: skip
    return paths


def ingest_rate(shards: list[Path], out: Path, workers: int, samples: int) -> float:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"] = {
        "out_dir": str(out),
        "samples_per_shard": 1000,
        "workers": workers,
        "sources": [{"format": "webdataset", "split": "web", "shards": [str(s) for s in shards]}],
    }
    path = out.parent / f"params_{workers}.yaml"
    path.write_text(yaml.safe_dump(params))
    start = time.perf_counter()
    manifest = ingest(load_params(path), show_progress=False)
    elapsed = time.perf_counter() - start
    assert manifest["splits"]["web"]["samples"] == samples, manifest["skipped"]
    return samples / elapsed


def s3_copies(shards: list[Path]) -> tuple[object, list[str]]:
    """moto's S3 server on a free port with the shards uploaded; the server and their s3:// URLs."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")  # fmt: skip
    fs = fsspec.filesystem("s3")
    fs.mkdir("bench")
    for shard in shards:
        fs.put_file(str(shard), f"bench/{shard.name}")
    return server, [f"s3://bench/{shard.name}" for shard in shards]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="ingest worker processes")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=12, help="loader batches of 32 timed per setting")
    args = parser.parse_args()
    results: dict = {"samples": args.samples, "cpu_count": os.cpu_count(), "ingest": {}, "loader": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shards = img2dataset_shards(Path(tmp), args.samples)
        results["megabytes"] = round(sum(s.stat().st_size for s in shards) / 1e6, 1)
        print(f"{args.samples} img2dataset samples, {len(shards)} shards, {results['megabytes']} MB")
        for workers in args.workers:
            rate = ingest_rate(shards, Path(tmp) / f"out{workers}", workers, args.samples)
            results["ingest"][workers] = {"samples_per_s": round(rate, 1)}
            print(f"ingest, {workers} worker(s): {rate:.0f} samples/s")
        server, urls = s3_copies(shards)
        try:
            for where, where_urls in (("local", [str(s) for s in shards]), ("s3", urls)):
                for workers in args.loader_workers:
                    rate = loader_rate(where_urls, workers, args.batches * workers)
                    results["loader"][f"{where}_{workers}"] = {"images_per_s": round(rate, 1)}
                    print(f"loader from {where}, {workers} worker(s): {rate:.0f} images/s")
        finally:
            server.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "object_storage.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
