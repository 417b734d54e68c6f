"""Shards read where they live, against a real S3 protocol server on 127.0.0.1 (moto's standalone server): img2dataset
shards streamed and mapped on the fly, bad remote input named, a pretraining and CapFilt reading s3://, CapFilt
writing its output there, and DVC noticing a changed source without copying it."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import requests
import webdataset as wds
import yaml
from PIL import Image

from blip.data.loader import eval_pipeline, train_pipeline
from blip.data.locations import describe, expand, shard_urls
from blip.data.shards import ShardReadError, TruncatedShardError, read_records, shard_samples
from blip.data.transforms import eval_transform
from tests.integration.servers import free_port

BUCKET, PRIVATE = "shards", "private"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """moto's S3 server with authentication on: a user allowed the `shards` bucket only (`private` exists too).
    Yields the environment a client needs (also set in this process)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    admin = {"aws_access_key_id": "admin", "aws_secret_access_key": "admin", "region_name": "us-east-1",
             "endpoint_url": endpoint}  # fmt: skip
    import boto3

    for bucket in (BUCKET, PRIVATE):
        boto3.client("s3", **admin).create_bucket(Bucket=bucket)
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="trainer")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
        f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}  # fmt: skip
    iam.put_user_policy(UserName="trainer", PolicyName="shards", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()  # auth from now on
    env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}  # fmt: skip
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
        server.stop()


def jpeg(colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, format=fmt)
    return out.getvalue()


def img2dataset_shard(path: Path, first: int, count: int) -> Path:
    """img2dataset's layout: `<key>.jpg` (or .png), `<key>.txt` caption, `<key>.json` metadata."""
    with wds.TarWriter(str(path)) as tar:
        for i in range(first, first + count):
            image = {"png": jpeg((i, 0, 0), "PNG")} if i % 2 else {"jpg": jpeg((i, 0, 0))}
            meta = {"url": f"http://example.com/{i}.jpg", "key": f"{i:09d}", "status": "success", "caption": "x"}
            tar.write({"__key__": f"{i:09d}", **image, "txt": f"A Photo of thing #{i}!", "json": meta})
    return path


def upload(local: Path, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.put_file(str(local), path)


def test_img2dataset_shards_stream_from_s3_and_bad_remote_input_is_named(s3: dict, tmp_path: Path) -> None:
    for shard in range(2):
        upload(img2dataset_shard(tmp_path / f"{shard:05d}.tar", shard * 5, 5), f"s3://{BUCKET}/laion/{shard:05d}.tar")
    pattern = f"s3://{BUCKET}/laion/{{00000..00001}}.tar"
    assert expand(pattern) == expand(f"s3://{BUCKET}/laion/") == [f"s3://{BUCKET}/laion/0000{i}.tar" for i in (0, 1)]

    records = read_records(expand(pattern))  # mapped to our record on the fly, captions cleaned as ingest does
    assert [r["captions"] for r in records] == [[f"a photo of thing {i}"] for i in range(10)]
    assert records[3] == {"image_id": "000000003", "origin": "web", "captions": ["a photo of thing 3"],
                          "url": "http://example.com/3.jpg"}  # fmt: skip
    batches = list(eval_pipeline(expand(pattern), "pairs", eval_transform(32), 4))
    images = [image for batch in batches for image in batch["image"]]
    assert len(images) == 10 and all(image.shape == (3, 32, 32) for image in images)  # png and jpg members decode
    assert sum(batch["skipped"] for batch in batches) == 0
    fs, _ = fsspec.core.url_to_fs(f"s3://{BUCKET}")  # no caption, no image, an empty caption: skipped and counted
    with fs.open(f"{BUCKET}/bad/00000.tar", "wb") as handle, wds.TarWriter(handle) as tar:
        tar.write({"__key__": "a", "jpg": jpeg((1, 2, 3))})
        tar.write({"__key__": "b", "txt": "a caption without an image"})
        tar.write({"__key__": "c", "jpg": jpeg((1, 2, 3)), "txt": "!!!"})
        tar.write({"__key__": "d", "jpg": jpeg((1, 2, 3)), "txt": "the one good sample"})
    batches = list(eval_pipeline([f"s3://{BUCKET}/bad/00000.tar"], "pairs", eval_transform(32), 4))
    assert [b["text"] for b in batches if b["key"]] == [[["the one good sample"]]]
    assert sum(batch["skipped"] for batch in batches) == 3

    listed = describe(expand(pattern))
    assert [s["size"] for s in listed] == [(tmp_path / f"0000{i}.tar").stat().st_size for i in (0, 1)]
    upload(img2dataset_shard(tmp_path / "changed.tar", 100, 5), f"s3://{BUCKET}/laion/00001.tar")
    assert describe(expand(pattern))[1]["version"] != listed[1]["version"]  # a replaced shard: a new ETag

    whole = (tmp_path / "00000.tar").read_bytes()
    fs.pipe_file(f"{BUCKET}/cut/00000.tar", whole[: len(whole) // 2])
    with pytest.raises(
        TruncatedShardError, match=r"s3://shards/cut/00000\.tar: ends mid-(member|header) after [0-4] samples"
    ):
        list(shard_samples(f"s3://{BUCKET}/cut/00000.tar"))
    with pytest.raises(ShardReadError, match=r"s3://shards/laion/00007\.tar: not found after 0 samples"):
        list(shard_samples(f"s3://{BUCKET}/laion/00007.tar"))
    # In training a missing or cut shard is noted and counted, the stream goes on; wholly unreadable, it stops.
    urls = [*expand(pattern), f"s3://{BUCKET}/laion/00007.tar", f"s3://{BUCKET}/cut/00000.tar"]
    batches = itertools.islice(iter(train_pipeline(urls, "pairs", eval_transform(32), 4, shuffle_buffer=4)), 12)
    noted = {(url, reason) for batch in batches for url, _, reason in batch["truncated"]}
    assert (f"s3://{BUCKET}/laion/00007.tar", "not found") in noted
    assert any(url == f"s3://{BUCKET}/cut/00000.tar" and reason.startswith("ends mid-") for url, reason in noted)
    with pytest.raises(RuntimeError, match=r"100 shards in a row unreadable .*wrong shard locations or credentials"):
        next(iter(train_pipeline([f"s3://{BUCKET}/laion/00007.tar"], "pairs", eval_transform(32), 4)))
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards not found: s3://shards/laion/00002\.tar"):
        describe(expand(f"s3://{BUCKET}/laion/{{00000..00002}}.tar"))
    with pytest.raises(PermissionError, match=r"access denied to shard s3://private/a\.tar"):
        list(shard_samples(f"s3://{PRIVATE}/a.tar"))


@pytest.fixture(scope="module")
def weights(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained tiny caption / retrieval weights with the project's vocabulary (CapFilt's plumbing, not quality)."""
    from blip.config import load_params
    from blip.data.tokenizer import load_tokenizer
    from blip.models.checkpoint import save_weights
    from blip.models.factory import build_model

    folder, vocab = tmp_path_factory.mktemp("weights"), str(project / "data/vocab/vocab.txt")
    params = load_params(project / "params.yaml", [f"tokenizer.name={vocab}"])
    return {task: save_weights(build_model(task, params.model, load_tokenizer(vocab), queue_size=0),
                               folder / f"{task}.safetensors", vocab) for task in ("caption", "retrieval")}  # fmt: skip


def stage_args(project: Path, **sets: object) -> list[str]:
    sets = {"data.shard_root": project / "data/shards", "tokenizer.name": project / "data/vocab/vocab.txt", **sets}
    return ["--params", str(project / "params.yaml")] + [f"--set={k}={v}" for k, v in sets.items()]


@pytest.mark.slow
def test_capfilt_and_pretraining_read_s3_and_capfilt_writes_there(
    s3: dict, project: Path, weights: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blip.stages.capfilt import main as capfilt_main
    from blip.stages.pretrain import main as pretrain_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for shard in shard_urls(project / "data/shards/web"):
        upload(Path(shard), f"s3://{BUCKET}/web/{Path(shard).name}")
    out = f"s3://{BUCKET}/capfilt/bootstrapped"
    capfilt = {"captioner": weights["caption"], "filter": weights["retrieval"], "out_dir": tmp_path / "capfilt",
               "work_dir": tmp_path / "work", "source_splits": json.dumps([f"s3://{BUCKET}/web/"]), "out_url": out,
               "threshold_rule": "calibrated", "calibration_keep": 0.5, "batch_size": 20, "max_length": 12,
               "min_length": 3, "gallery_images": 2}  # fmt: skip
    args = stage_args(project, **{f"capfilt.{k}": v for k, v in capfilt.items()})
    assert capfilt_main(args) == 0

    manifest = json.loads((tmp_path / "capfilt/manifest.json").read_text())
    uploaded = expand(out + "/")
    assert [s["url"] for s in manifest["shards"]] == uploaded and len(uploaded) == manifest["units"] == 8 + 2
    assert all(s["version"] for s in manifest["shards"])  # the ETags DVC tracks through the manifest
    assert not list((tmp_path / "work").rglob("*.tar"))  # the local copies went once uploaded
    records = read_records(uploaded)
    metrics = json.loads(Path("metrics/capfilt.json").read_text())
    assert sum(r["origin"] == "web" for r in records) == metrics["web_kept"] > 0
    assert sum(r["origin"] == "human" for r in records) == 40 and metrics["web_total"] == 200

    # Killed after unit 3's upload, before its commit mark: a rerun redoes unit 3 only, to the same bytes.
    before = describe(uploaded)
    (tmp_path / "work/units/unit-000003.json").unlink()
    assert capfilt_main(args) == 0
    assert describe(uploaded) == before and read_records(uploaded) == records

    train = {"splits": json.dumps([out, f"s3://{BUCKET}/web/shard-{{000000..000007}}.tar"]), "steps_per_epoch": 3,
             "batch_size": 8, "warmup_steps": 1, "eval_images": 10, "checkpoint_dir": tmp_path / "ck",
             "output": tmp_path / "pretrain.safetensors", "queue_size": 16}  # fmt: skip
    assert pretrain_main(stage_args(project, **{f"pretrain.{k}": v for k, v in train.items()})) == 0
    assert json.loads(Path("metrics/pretrain.json").read_text())["step"] == 3


def dvc(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_a_changed_s3_source_makes_dvc_report_the_stages_reading_it(
    s3: dict, clone: tuple[Path, dict], tmp_path: Path
) -> None:
    copy, env = clone
    env = {**env, **s3, "DVC_NO_ANALYTICS": "1"}
    for shard in range(2):
        upload(img2dataset_shard(tmp_path / f"{shard}.tar", shard * 5, 5), f"s3://{BUCKET}/src/{shard:05d}.tar")
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["pretrain"]["splits"] = ["web", "clean_train", f"s3://{BUCKET}/src/{{00000..00001}}.tar"]
    (copy / "params.yaml").write_text(yaml.safe_dump(params))
    from dvc.repo import Repo

    with Repo(str(copy)) as repo:  # outputs stand in for a finished run: only the source's version matters here
        for out in (copy / str(out) for stage in repo.index.stages for out in stage.outs):
            (out.parent if out.suffix else out).mkdir(parents=True, exist_ok=True)
            (out if out.suffix else out / "placeholder").write_text("placeholder\n")
    dvc(["repro", "--single-item", "sources"], copy, env)
    listed = json.loads((copy / "data/sources.json").read_text())
    assert [s["url"] for s in listed[f"s3://{BUCKET}/src/{{00000..00001}}.tar"]] == [
        f"s3://{BUCKET}/src/0000{i}.tar" for i in (0, 1)]  # fmt: skip
    dvc(["commit", "--force", "--quiet"], copy, env)

    def changed() -> set[str]:
        return {name.split("@")[0] for name in json.loads(dvc(["status", "--json"], copy, env) or "{}")} - {"sources"}

    dvc(["repro", "--single-item", "sources"], copy, env)
    assert changed() == set()  # the source as it was: nothing to rerun
    upload(img2dataset_shard(tmp_path / "new.tar", 50, 5), f"s3://{BUCKET}/src/00001.tar")
    dvc(["repro", "--single-item", "sources"], copy, env)  # lists the source: no shard is copied
    readers = {"vocab", "pretrain", "capfilt", "repretrain", "caption-finetune", "retrieval-finetune",
               "retrieval-zeroshot", "vqa-finetune", "nlvr-finetune"}  # fmt: skip
    assert readers <= changed()
    listed = json.loads((copy / "data/sources.json").read_text())[f"s3://{BUCKET}/src/{{00000..00001}}.tar"]
    assert listed[1]["size"] == (tmp_path / "new.tar").stat().st_size  # listed, not copied: no bytes in DVC's cache
    assert not any(p.is_file() and p.stat().st_size == listed[1]["size"] for p in (copy / ".dvc/cache").rglob("*"))
