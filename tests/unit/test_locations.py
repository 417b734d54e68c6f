"""Split names and shard locations: what expands to which shard URLs, and what the config accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip.config import ConfigError, load_params
from blip.data.locations import describe, expand, is_name, split_urls
from blip.data.shards import ShardWriter, read_records


def shards(folder: Path, count: int, name: str = "shard-{:06d}.tar") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / name.format(i)).write_bytes(b"x" * (i + 1))
    return [folder / name.format(i) for i in range(count)]


def test_names_and_locations_expand_to_shard_urls(tmp_path: Path) -> None:
    named = shards(tmp_path / "root/web", 2)
    other = shards(tmp_path / "laion", 3, "{:05d}.tar")
    (tmp_path / "laion/notes.txt").write_text("not a shard")
    assert is_name("web") and not is_name(str(tmp_path / "laion")) and not is_name("s3://b/x")
    assert split_urls(tmp_path / "root", "web") == [str(p) for p in named]
    assert expand(str(tmp_path / "laion")) == expand(str(tmp_path / "laion/*.tar")) == [str(p) for p in other]
    assert expand(str(tmp_path / "laion/{00000..00001}.tar")) == [str(p) for p in other[:2]]
    assert expand("pipe:cat /x/{0..2}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar", "pipe:cat /x/2.tar"]
    with pytest.raises(FileNotFoundError, match=r"no shards \(\*\.tar\) at .*empty"):
        expand(str(tmp_path / "empty"))
    assert [s["size"] for s in describe(expand(str(tmp_path / "laion")))] == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards not found: .*00009\.tar"):
        describe([*expand(str(tmp_path / "laion/{00000..00001}.tar")), str(tmp_path / "laion/00009.tar")])


def test_a_pipe_location_streams_a_command_output(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "s", 10)
    writer.write("a", {"jpg": b"...", "json": b'{"captions": ["one"]}'})
    writer.close()
    assert read_records(expand(f"pipe:cat {tmp_path}/s/shard-{{000000..000000}}.tar")) == [{"captions": ["one"]}]


def test_the_config_takes_names_or_locations_and_names_what_it_refuses(tmp_path: Path) -> None:
    params = load_params(overrides=['pretrain.splits=["web", "s3://bucket/laion/{00000..00009}.tar"]'])
    assert params.pretrain.splits == ["web", "s3://bucket/laion/{00000..00009}.tar"]
    with pytest.raises(ConfigError, match=r"neither a split name .* nor a location"):
        load_params(overrides=["caption.eval_split=Clean Test"])
