"""The synthetic world: deterministic, and every caption/answer/label true of the pixels it rendered.

The scenes are read back from the images by `read_scene`, written here independently of the renderer:
background by majority, then per grid cell the colour (nearest palette entry), the size (bounding box) and the
shape (fill ratio of the bounding box, and where the widest row lies).
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from blip.config.schema import WorldConfig
from blip.data import language, synthetic
from blip.data.scene import COLOURS, GRID, Obj, Scene, encode_jpeg, render

CFG = WorldConfig(seed=3, web_images=400, clean_train=40, clean_val=10, clean_test=20, nlvr_train=60, nlvr_test=20)


def read_scene(image: Image.Image) -> list[tuple[str, str, str, int, int]]:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    size = pixels.shape[0]
    values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    background = values[counts.argmax()]
    palette = {name: np.array(rgb) for name, rgb in COLOURS.items()}
    found = []
    cell = size / GRID
    for row in range(GRID):
        for col in range(GRID):
            y0, y1, x0, x1 = (round(v) for v in (row * cell, (row + 1) * cell, col * cell, (col + 1) * cell))
            patch = pixels[y0:y1, x0:x1]
            mask = np.abs(patch - background).sum(axis=2) > 60
            if mask.sum() < 4:
                continue
            median = np.median(patch[mask], axis=0)
            colour = min(palette, key=lambda name: np.abs(palette[name] - median).sum())
            ys, xs = np.nonzero(mask)
            width = xs.max() - xs.min() + 1
            box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            fill = box.mean()
            rows = box.sum(axis=1)
            if fill > 0.9:
                shape = "square"
            elif fill > 0.68:
                shape = "circle"
            else:  # a triangle is widest at its base, a diamond at its middle
                shape = "triangle" if rows[-1] >= rows.max() - 1 and rows[-1] > rows[len(rows) // 2] else "diamond"
            found.append((shape, colour, "large" if width > 0.65 * cell else "small", row, col))
    return found


def as_scene(found: list[tuple[str, str, str, int, int]]) -> Scene:
    return Scene(tuple(Obj(*obj) for obj in found), background=0)


def from_record(scene_json: dict) -> list[tuple[str, str, str, int, int]]:
    return sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"]) for o in scene_json["objects"])


@pytest.fixture(scope="module")
def items() -> list:
    return list(synthetic.generate(CFG))


def test_generation_is_deterministic(items: list) -> None:
    again = list(synthetic.generate(CFG))
    assert [i.record for i in again] == [i.record for i in items]
    for a, b in zip(again, items, strict=True):
        assert {k: v.tobytes() for k, v in a.images.items()} == {k: v.tobytes() for k, v in b.images.items()}
    other = list(synthetic.generate(CFG.model_copy(update={"seed": 4})))
    assert [i.record for i in other] != [i.record for i in items]


def test_split_sizes(items: list) -> None:
    counts = Counter(i.split for i in items)
    assert counts["web"] == 400 and counts["clean_train"] == 40 and counts["clean_val"] == 10
    assert counts["clean_test"] == 20 and counts["nlvr_train"] == 60 and counts["nlvr_test"] == 20
    assert counts["vqa_train"] == 40 * 3 and counts["vqa_test"] == 20 * 3
    assert len(items) == synthetic.item_count(CFG)


def test_renderer_draws_every_shape_readably() -> None:
    for shape in ("circle", "square", "triangle", "diamond"):
        for colour in COLOURS:
            for size in ("small", "large"):
                scene = Scene((Obj(shape, colour, size, 1, 1, dx=0.7, dy=-0.4),), background=45)
                assert read_scene(render(scene, 64)) == [(shape, colour, size, 1, 1)]


def test_scenes_read_back_from_pixels(items: list) -> None:
    for item in items:
        if item.kind == "nlvr":
            assert sorted(read_scene(item.images["left.jpg"])) == from_record(item.record["world"]["left"])
            assert sorted(read_scene(item.images["right.jpg"])) == from_record(item.record["world"]["right"])
        else:
            assert sorted(read_scene(item.images["jpg"])) == from_record(item.record["world"]["scene"])


def test_jpeg_round_trip_keeps_the_scene(items: list) -> None:
    for item in (i for i in items if i.kind == "pairs"):
        jpeg = encode_jpeg(item.images["jpg"], quality=95)  # what ingest stores
        assert sorted(read_scene(Image.open(io.BytesIO(jpeg)))) == from_record(item.record["world"]["scene"])


def test_captions_are_true_of_the_pixels_and_noise_is_false(items: list) -> None:
    web = [i for i in items if i.split == "web"]
    for item in web:
        scene = as_scene(read_scene(item.images["jpg"]))
        (caption,) = item.record["captions"]
        assert language.is_true(caption, scene) is not item.record["world"]["noisy"], caption
    for item in (i for i in items if i.split.startswith("clean_")):
        scene = as_scene(read_scene(item.images["jpg"]))
        assert len(set(item.record["captions"])) == CFG.captions_per_image
        assert all(language.is_true(c, scene) for c in item.record["captions"]), item.record["captions"]


def test_noise_fraction_and_mix(items: list) -> None:
    web = [i.record["world"] for i in items if i.split == "web"]
    noisy = [w["noise"] for w in web if w["noisy"]]
    assert abs(len(noisy) / len(web) - 0.4) < 0.07
    mix = Counter(noisy)
    assert set(mix) == {"swap", "attribute", "unrelated"}
    assert mix["unrelated"] < mix["swap"] and mix["unrelated"] < mix["attribute"]
    assert all(w["noise"] is None for w in web if not w["noisy"])


def test_vqa_answers_match_the_pixels(items: list) -> None:
    seen_types = set()
    for item in (i for i in items if i.kind == "vqa"):
        objects = read_scene(item.images["jpg"])
        words = item.record["question"].rstrip("?").split()
        # Answers recomputed from the pixels, independently of the generator's answer function.
        if words[:2] == ["how", "many"]:
            expected = str(sum(words[2] == "shapes" or o[1] == words[2] for o in objects))
        elif words[:2] == ["is", "there"]:
            expected = "yes" if any((o[1], o[0]) == (words[3], words[4]) for o in objects) else "no"
        elif words[:2] == ["what", "color"]:
            (expected,) = [o[1] for o in objects if o[0] == words[4]]
        else:
            ((_, _, _, row, col),) = [o for o in objects if (o[1], o[0]) == (words[3], words[4])]
            expected = f"{('top', 'middle', 'bottom')[row]} {('left', 'center', 'right')[col]}"
        seen_types.add(words[0])
        assert item.record["answers"] == [expected] * 10, item.record["question"]
        assert expected in language.answer_list()
    assert seen_types == {"how", "is", "what", "where"}


def test_nlvr_labels_match_the_pixels_and_are_balanced(items: list) -> None:
    nlvr = [i for i in items if i.kind == "nlvr"]
    for item in nlvr:
        left = as_scene(read_scene(item.images["left.jpg"]))
        right = as_scene(read_scene(item.images["right.jpg"]))
        assert language.nlvr_truth(item.record["sentence"], left, right) is item.record["label"]
    share = sum(i.record["label"] for i in nlvr) / len(nlvr)
    assert 0.35 < share < 0.65
