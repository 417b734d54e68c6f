from __future__ import annotations

import re
from pathlib import Path

import pytest

from blip.cli import main as blip_main
from blip.config import ConfigError, flatten, load_params
from tests.conftest import REPO, write_params


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_params(path, overrides or [])
    return str(caught.value)


def test_committed_params_and_presets_validate() -> None:
    tiny = load_params(REPO / "params.yaml")
    assert tiny.model.preset == "tiny" and tiny.world.noise_fraction == 0.4
    base = load_params(REPO / "configs/base.yaml")
    large = load_params(REPO / "configs/large.yaml")
    assert (base.model.vision_width, base.model.vision_depth, base.pretrain.batch_size) == (768, 12, 2880)
    assert (large.model.vision_width, large.model.vision_depth, large.pretrain.lr) == (1024, 24, 2e-4)
    for preset in (base, large):
        assert preset.pretrain.queue_size == 57600 and preset.pretrain.queue_size % preset.pretrain.batch_size == 0
        assert preset.data.pretrain_augment.crop_scale == (0.2, 1.0) and preset.data.pretrain_augment.hflip


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write_params(tmp_path, pretrain={"lrr": 0.1})
    assert "pretrain.lrr: Extra inputs are not permitted" in error_of(path)
    path = write_params(tmp_path, bogus={"a": 1})
    assert "bogus: Extra inputs are not permitted" in error_of(path)


def test_wrong_type_is_named(tmp_path: Path) -> None:
    path = write_params(tmp_path, pretrain={"batch_size": "many"})
    message = error_of(path)
    assert "pretrain.batch_size" in message and "'many'" in message


def test_impossible_values_are_named(tmp_path: Path) -> None:
    assert "pretrain.lr: Input should be greater than 0" in error_of(write_params(tmp_path, pretrain={"lr": -1e-4}))
    message = error_of(write_params(tmp_path, pretrain={"queue_size": 1000, "batch_size": 64}))
    assert "pretrain: queue_size 1000 is not a multiple of the global batch_size 64" in message
    message = error_of(write_params(tmp_path, world={"noise_mix": {"swap": 0.5, "attribute": 0.5, "unrelated": 0.5}}))
    assert "world.noise_mix" in message and "sum to 1" in message
    message = error_of(write_params(tmp_path, model={"vision_width": 100, "vision_heads": 3}))
    assert "vision_width 100 is not divisible by vision_heads 3" in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    source = {"format": "coco_karpathy", "split": "coco", "annotations": "nope.json", "image_root": str(tmp_path)}
    path = write_params(tmp_path, ingest={"sources": [source]})
    message = error_of(path)
    assert "ingest.sources.0.coco_karpathy.annotations: Path does not point to a file" in message
    assert "params file not found" in error_of(tmp_path / "missing.yaml")


def test_bad_split_name_and_clashing_splits(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[]")
    source = {"format": "coco_karpathy", "annotations": str(tmp_path / "a.json"), "image_root": str(tmp_path)}
    message = error_of(write_params(tmp_path, ingest={"sources": [{**source, "split": "../evil"}]}))
    assert "ingest.sources.0.coco_karpathy.split" in message
    clash = [{"format": "synthetic"}, {**source, "split": "web"}]
    assert "more than one source writes split(s) ['web']" in error_of(write_params(tmp_path, ingest={"sources": clash}))


def test_env_and_cli_overrides_with_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_params(tmp_path)
    monkeypatch.setenv("BLIP__PRETRAIN__LR", "0.002")
    monkeypatch.setenv("BLIP__WORLD__SEED", "5")
    params = load_params(path, ["world.seed=9", "data.pretrain_augment.crop_scale=[0.3, 0.9]"])
    assert params.pretrain.lr == 0.002  # env over the file
    assert params.world.seed == 9  # --set over env
    assert params.data.pretrain_augment.crop_scale == (0.3, 0.9)
    assert params.pretrain.batch_size == 64  # untouched keys keep the file's value
    assert flatten(params)["world.seed"] == 9


def test_bad_overrides_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_params(tmp_path)
    assert "pretrain.nope: Extra inputs are not permitted" in error_of(path, ["pretrain.nope=1"])
    assert "expected section.key=value" in error_of(path, ["pretrain.lr"])
    monkeypatch.setenv("BLIP__PRETRAIN__LR", "-3")
    assert "pretrain.lr: Input should be greater than 0" in error_of(path)
    monkeypatch.delenv("BLIP__PRETRAIN__LR")
    monkeypatch.setenv("BLIP__PRETRAINN__LR", "1")
    assert "BLIP__PRETRAINN__LR: unknown section 'pretrainn'" in error_of(path)


def test_cli_reports_config_errors_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_params(tmp_path, pretrain={"lr": -1})
    out_dir = tmp_path / "shards"
    code = blip_main(["ingest", "--params", str(path), "--set", f"ingest.out_dir={out_dir}"])
    assert code == 2
    assert "pretrain.lr: Input should be greater than 0" in capsys.readouterr().err
    assert not out_dir.exists()


def test_a_relative_path_that_does_not_resolve_names_the_folder_it_was_resolved_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blip.data.tokenizer import load_tokenizer
    from blip.models.checkpoint import read_file

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"not found: data/vocab96/vocab.txt (resolved from {tmp_path})")):
        load_tokenizer("data/vocab96/vocab.txt")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"not found: models/x.safetensors (resolved from {tmp_path})")
    ):
        read_file(Path("models/x.safetensors"))
    assert f"params file not found: own.yaml (resolved from {tmp_path})" in error_of(Path("own.yaml"))
