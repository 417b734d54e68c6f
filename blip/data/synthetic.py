"""The built-in synthetic world (deterministic from a seed): every split the default pipeline trains on.

- "web" pretraining pairs: one alt-text-like caption each (objects named in full, no positions); a configured
  fraction is noise (another image's caption, one attribute made wrong, or unrelated text), recorded so CapFilt
  can be measured;
- a clean human-annotated set, 5 varied captions per image, in a Karpathy-style train/val/test split;
- VQA questions (count, colour, existence, position) on the clean train/test images, with an answer list;
- NLVR2-style pairs of images with a true/false statement.

Every caption, answer and label is decided by `blip.data.language` against the scene that was rendered; the
tests check that by reading the scenes back from the pixels. Each item draws from its own `random.Random`
seeded by (seed, split, index), so any item can be regenerated alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from blip.config.schema import WorldConfig
from blip.data import language
from blip.data.items import Item
from blip.data.scene import COLOURS, SHAPES, Scene, item_rng, render, sample_scene

UNRELATED = (
    "free shipping on all orders",
    "click here to download the full catalogue",
    "stock photo royalty free",
    "company logo",
    "best price guaranteed",
    "view our new collection",
    "image not available",
    "subscribe to our newsletter",
    "wedding dress sale",
    "screenshot 2019",
)


def _world_truth(scene: Scene, **extra: object) -> dict:
    # Measuring-only facts about an item; no stage may read them to make a decision.
    return {"scene": scene.to_json(), **extra}


def _web_caption(seed: int, index: int, scene: Scene) -> str:
    rng = item_rng(seed, "web-caption", index)
    return language.to_text(rng.choice(language.true_meanings(scene, rng, positions=False)))


def _web_item(cfg: WorldConfig, index: int) -> Item:
    rng = item_rng(cfg.seed, "web", index)
    scene = sample_scene(rng, cfg.max_objects)
    caption, noise = _web_caption(cfg.seed, index, scene), None
    if rng.random() < cfg.noise_fraction:
        mix = cfg.noise_mix
        noise = rng.choices(("swap", "attribute", "unrelated"), (mix.swap, mix.attribute, mix.unrelated))[0]
        for _ in range(100):  # resample until the noise really is false of this image
            if noise == "swap":
                other = rng.choice([j for j in range(cfg.web_images) if j != index] or [index + 1])
                other_scene = sample_scene(item_rng(cfg.seed, "web", other), cfg.max_objects)
                candidate = _web_caption(cfg.seed, other, other_scene)
            elif noise == "attribute":
                true = rng.choice(language.true_meanings(scene, rng, positions=False))
                candidate = language.to_text(language.mutate(true, rng))
            else:
                candidate = rng.choice(UNRELATED)
            if not language.is_true(candidate, scene):
                caption = candidate
                break
        else:
            noise = None  # no false caption found in 100 draws: keep the true one, recorded as clean
    record = {
        "image_id": f"web_{index:07d}",
        "captions": [caption],
        "origin": "web",
        "world": _world_truth(scene, noisy=noise is not None, noise=noise),
    }
    return Item("web", "pairs", f"synthetic:web/{index}", {"jpg": render(scene, cfg.image_size)}, record)


def _clean_captions(scene: Scene, rng: random.Random, count: int) -> list[str]:
    pool = language.true_meanings(scene, rng, positions=True)
    rng.shuffle(pool)
    first = [language.to_text(meaning, rng.choice(language.PREFIXES)) for meaning in pool]
    # A one-object scene has fewer meanings than captions: other prefixes vary the wording of the same ones.
    more = [language.to_text(meaning, prefix) for meaning in pool for prefix in language.PREFIXES]
    rng.shuffle(more)
    return list(dict.fromkeys(first + more))[:count]


def _clean_items(cfg: WorldConfig) -> Iterator[Item]:
    start = 0
    for name, size in (("train", cfg.clean_train), ("val", cfg.clean_val), ("test", cfg.clean_test)):
        for index in range(start, start + size):
            rng = item_rng(cfg.seed, "clean", index)
            scene = sample_scene(rng, cfg.max_objects)
            image_id = f"clean_{index:07d}"
            image = render(scene, cfg.image_size)
            captions = _clean_captions(scene, rng, cfg.captions_per_image)
            record = {"image_id": image_id, "captions": captions, "origin": "human"}
            record["world"] = _world_truth(scene)
            yield Item(f"clean_{name}", "pairs", f"synthetic:clean/{index}", {"jpg": image}, record)
            if name == "val":
                continue
            questions = language.vqa_candidates(scene, rng)
            for q, question in enumerate(rng.sample(questions, min(len(questions), cfg.vqa_questions_per_image))):
                vqa = {
                    "image_id": image_id,
                    "question_id": index * 10 + q,
                    "question": question,
                    "answers": [language.answer(question, scene)] * 10,
                    "world": _world_truth(scene),
                }
                yield Item(f"vqa_{name}", "vqa", f"synthetic:vqa/{index}/{q}", {"jpg": image}, vqa)
        start += size


def _nlvr_item(cfg: WorldConfig, split: str, index: int) -> Item:
    rng = item_rng(cfg.seed, split, index)
    left, right = sample_scene(rng, cfg.max_objects), sample_scene(rng, cfg.max_objects)
    target = rng.random() < 0.5
    for _ in range(100):  # draw statements until one has the target label
        form = rng.choice(language.NLVR_FORMS)
        obj = rng.choice(rng.choice((left, right)).objects)
        desc = (
            language.partial(obj, rng)
            if rng.random() < 0.7
            else language.Desc(None, rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
        )
        statement = language.nlvr_statement(form, desc, rng.randint(2, 2 * cfg.max_objects))
        if language.nlvr_truth(statement, left, right) == target:
            break
    record = {
        "pair_id": f"{split}_{index:07d}",
        "sentence": statement,
        "label": language.nlvr_truth(statement, left, right),
        "world": {"left": left.to_json(), "right": right.to_json()},
    }
    images = {"left.jpg": render(left, cfg.image_size), "right.jpg": render(right, cfg.image_size)}
    return Item(split, "nlvr", f"synthetic:{split}/{index}", images, record)


def generate(cfg: WorldConfig) -> Iterator[Item]:
    """Every item of the world, split by split (see `SYNTHETIC_SPLITS`); images are PIL images."""
    for index in range(cfg.web_images):
        yield _web_item(cfg, index)
    yield from _clean_items(cfg)
    for split, size in (("nlvr_train", cfg.nlvr_train), ("nlvr_test", cfg.nlvr_test)):
        for index in range(size):
            yield _nlvr_item(cfg, split, index)


def item_count(cfg: WorldConfig) -> int:
    """How many items `generate` yields (every image has at least three askable questions)."""
    vqa = (cfg.clean_train + cfg.clean_test) * cfg.vqa_questions_per_image
    return cfg.web_images + cfg.clean_train + cfg.clean_val + cfg.clean_test + vqa + cfg.nlvr_train + cfg.nlvr_test
