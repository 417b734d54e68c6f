"""The synthetic world's language: captions, VQA questions and NLVR2 statements, and what makes them true.

Text is produced from small structured meanings and parsed back from text, so the truth of *any* caption
(a web caption, a human one, or one a captioner generated) can be decided exactly against a scene. Text the
grammar does not parse is never true. This is the world's oracle: stages may use it only to measure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from blip.data.scene import COLOURS, GRID, SHAPES, SIZES, Obj, Scene

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
PREFIXES = ("", "an image of ", "a drawing of ", "a photo of ")
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")


@dataclass(frozen=True)
class Desc:
    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def text(self) -> str:
        words = [w for w in (self.size, self.colour) if w]
        return " ".join(["a", *words, self.shape or "shape"])

    def matches(self, obj: Obj) -> bool:
        return all(
            want is None or want == have
            for want, have in ((self.size, obj.size), (self.colour, obj.colour), (self.shape, obj.shape))
        )


@dataclass(frozen=True)
class Exists:  # "a red circle", "a red circle on the left"
    desc: Desc
    position: str | None = None


@dataclass(frozen=True)
class Pair:  # "a red circle and a blue square"
    first: Desc
    second: Desc


@dataclass(frozen=True)
class Relation:  # "a red circle to the left of a blue square"
    first: Desc
    relation: str
    second: Desc


@dataclass(frozen=True)
class Count:  # "two red shapes", exactly that many
    n: int
    colour: str | None = None
    shape: str | None = None


Meaning = Exists | Pair | Relation | Count


# ---------------------------------------------------------------- text from meanings, and back
def to_text(meaning: Meaning, prefix: str = "") -> str:
    if isinstance(meaning, Exists):
        body = meaning.desc.text() + (f" {POSITIONS[meaning.position]}" if meaning.position else "")
    elif isinstance(meaning, Pair):
        body = f"{meaning.first.text()} and {meaning.second.text()}"
    elif isinstance(meaning, Relation):
        body = f"{meaning.first.text()} {RELATIONS[meaning.relation]} {meaning.second.text()}"
    else:
        noun = meaning.shape or "shape"
        words = [NUMBERS[meaning.n], meaning.colour, noun if meaning.n == 1 else noun + "s"]
        body = " ".join(w for w in words if w)
    return prefix + body


def _parse_desc(words: list[str], i: int) -> tuple[Desc, int] | None:
    if i >= len(words) or words[i] not in ("a", "an"):
        return None
    i += 1
    size = words[i] if i < len(words) and words[i] in SIZES else None
    i += size is not None
    colour = words[i] if i < len(words) and words[i] in COLOURS else None
    i += colour is not None
    if i < len(words) and (words[i] in SHAPES or words[i] == "shape"):
        return Desc(size, colour, None if words[i] == "shape" else words[i]), i + 1
    return None


def _phrase_at(words: list[str], i: int, phrases: dict[str, str]) -> tuple[str, int] | None:
    for key, phrase in phrases.items():
        tokens = phrase.split()
        if words[i : i + len(tokens)] == tokens:
            return key, i + len(tokens)
    return None


def parse(text: str) -> Meaning | None:
    words = text.lower().split()
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if prefix and words[: len(prefix.split())] == prefix.split():
            words = words[len(prefix.split()) :]
            break
    if not words:
        return None
    if words[0] in NUMBERS:  # count
        n, rest = NUMBERS.index(words[0]), words[1:]
        colour = rest.pop(0) if rest and rest[0] in COLOURS else None
        if len(rest) != 1:
            return None
        noun = rest[0] if n == 1 else rest[0].removesuffix("s")
        if (noun != "shape" and noun not in SHAPES) or (n != 1) != rest[0].endswith("s"):
            return None
        return Count(n, colour, None if noun == "shape" else noun)
    first = _parse_desc(words, 0)
    if first is None:
        return None
    desc, i = first
    if i == len(words):
        return Exists(desc)
    if (position := _phrase_at(words, i, POSITIONS)) and position[1] == len(words):
        return Exists(desc, position[0])
    if words[i] == "and" and (second := _parse_desc(words, i + 1)) and second[1] == len(words):
        return Pair(desc, second[0])
    if (relation := _phrase_at(words, i, RELATIONS)) and (
        (second := _parse_desc(words, relation[1])) and second[1] == len(words)
    ):
        return Relation(desc, relation[0], second[0])
    return None


# ---------------------------------------------------------------- truth
def in_position(obj: Obj, position: str) -> bool:
    last = GRID - 1
    return {
        "left": obj.col == 0,
        "right": obj.col == last,
        "top": obj.row == 0,
        "bottom": obj.row == last,
        "middle": obj.row == obj.col == last // 2,
    }[position]


def related(a: Obj, relation: str, b: Obj) -> bool:
    return {
        "left": a.col < b.col,
        "right": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def holds(meaning: Meaning, scene: Scene) -> bool:
    objs = scene.objects
    if isinstance(meaning, Exists):
        return any(
            meaning.desc.matches(o) and (meaning.position is None or in_position(o, meaning.position)) for o in objs
        )
    if isinstance(meaning, Count):
        return sum(Desc(None, meaning.colour, meaning.shape).matches(o) for o in objs) == meaning.n
    pairs = [(a, b) for a in objs for b in objs if a is not b]
    if isinstance(meaning, Pair):
        return any(meaning.first.matches(a) and meaning.second.matches(b) for a, b in pairs)
    return any(
        meaning.first.matches(a) and meaning.second.matches(b) and related(a, meaning.relation, b) for a, b in pairs
    )


def is_true(caption: str, scene: Scene) -> bool:
    """Whether a caption is true of a scene; unparseable text is false."""
    meaning = parse(caption)
    return meaning is not None and holds(meaning, scene)


# ---------------------------------------------------------------- true captions of a scene
def full(obj: Obj) -> Desc:
    return Desc(obj.size, obj.colour, obj.shape)


def partial(obj: Obj, rng: random.Random) -> Desc:
    """What a short alt-text would say: colour and shape, the shape alone, or the colour alone."""
    kind = rng.choice(("colour+shape", "colour+shape", "shape", "colour"))
    return Desc(None, obj.colour if "colour" in kind else None, obj.shape if "shape" in kind else None)


def true_meanings(scene: Scene, rng: random.Random, positions: bool) -> list[Meaning]:
    """Candidate true captions, each naming its objects in full (size, colour, shape): one object, a pair, or a
    relation, and with `positions` an object's place too (human captions; web alt text omits it). Counts and
    partial descriptions are left to VQA and NLVR2: "two shapes" fits a third of all images, and such captions
    made most ITM hard negatives true of their image, so the filter's ITM could not learn."""
    out: list[Meaning] = []
    for obj in scene.objects:
        out.append(Exists(full(obj)))
        places = [p for p in POSITIONS if in_position(obj, p)]
        if places and positions:
            out.append(Exists(full(obj), rng.choice(places)))
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            out.append(Pair(full(a), full(b)))
            relations = [r for r in RELATIONS if related(a, r, b)]
            out.append(Relation(full(a), rng.choice(relations), full(b)))
    return out


def mutate(meaning: Meaning, rng: random.Random) -> Meaning:
    """Change one attribute (a colour, shape, size, relation, position or number) to another value."""

    def other(value: str | None, choices: tuple[str, ...]) -> str:
        return rng.choice([c for c in choices if c != value])

    def mutate_desc(desc: Desc) -> Desc:
        fields = [f for f in ("size", "colour", "shape") if getattr(desc, f)] or ["colour"]
        field = rng.choice(fields)
        choices = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES}[field]
        return replace(desc, **{field: other(getattr(desc, field), choices)})

    if isinstance(meaning, Count):
        return replace(meaning, n=rng.choice([n for n in range(0, 4) if n != meaning.n]))
    if isinstance(meaning, Exists):
        if meaning.position and rng.random() < 0.3:
            return replace(meaning, position=other(meaning.position, tuple(POSITIONS)))
        return replace(meaning, desc=mutate_desc(meaning.desc))
    if isinstance(meaning, Relation) and rng.random() < 0.3:
        return replace(meaning, relation=other(meaning.relation, tuple(RELATIONS)))
    if rng.random() < 0.5:
        return replace(meaning, first=mutate_desc(meaning.first))
    return replace(meaning, second=mutate_desc(meaning.second))


# ---------------------------------------------------------------- VQA
def vqa_candidates(scene: Scene, rng: random.Random) -> list[str]:
    """Questions whose answer the scene decides (answers come from `answer`)."""
    objs = scene.objects
    questions = ["how many shapes are there?"]
    questions.append(f"how many {rng.choice(tuple(COLOURS))} shapes are there?")
    present = rng.choice(objs)
    asked = (present.colour, present.shape) if rng.random() < 0.5 else (rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
    questions.append(f"is there a {asked[0]} {asked[1]}?")
    unique_shapes = [s for s in SHAPES if sum(o.shape == s for o in objs) == 1]
    if unique_shapes:
        questions.append(f"what color is the {rng.choice(unique_shapes)}?")
    unique = [o for o in objs if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objs) == 1]
    if unique:
        obj = rng.choice(unique)
        questions.append(f"where is the {obj.colour} {obj.shape}?")
    return questions


def answer(question: str, scene: Scene) -> str:
    words = question.rstrip("?").split()
    objs = scene.objects
    if words[:2] == ["how", "many"]:
        colour = words[2] if words[2] in COLOURS else None
        return str(sum(colour is None or o.colour == colour for o in objs))
    if words[:3] == ["is", "there", "a"]:
        return "yes" if any((o.colour, o.shape) == (words[3], words[4]) for o in objs) else "no"
    if words[:3] == ["what", "color", "is"]:
        return next(o.colour for o in objs if o.shape == words[4])
    if words[:3] == ["where", "is", "the"]:
        obj = next(o for o in objs if (o.colour, o.shape) == (words[3], words[4]))
        return f"{ROW_NAMES[obj.row]} {COL_NAMES[obj.col]}"
    raise ValueError(f"not a question of this world: {question!r}")


def answer_list() -> list[str]:
    positions = [f"{r} {c}" for r in ROW_NAMES for c in COL_NAMES]
    return ["yes", "no", *map(str, range(4)), *COLOURS, *positions]


# ---------------------------------------------------------------- NLVR2 statements over two scenes
NLVR_FORMS = ("left", "right", "both", "exactly one", "total", "more")


def nlvr_statement(form: str, desc: Desc | None, n: int | None) -> str:
    if form in ("left", "right"):
        return f"the {form} image contains {desc.text()}"
    if form == "both":
        return f"both images contain {desc.text()}"
    if form == "exactly one":
        return f"exactly one image contains {desc.text()}"
    if form == "total":
        return f"there are {NUMBERS[n]} shapes in total"
    return "the left image has more shapes than the right image"


def nlvr_truth(statement: str, left: Scene, right: Scene) -> bool:
    words = statement.split()

    def contains(scene: Scene, start: int) -> bool:
        parsed = _parse_desc(words, start)
        if parsed is None or parsed[1] != len(words):
            raise ValueError(f"not a statement of this world: {statement!r}")
        return any(parsed[0].matches(o) for o in scene.objects)

    if words[:1] == ["the"] and words[2:4] == ["image", "contains"]:
        return contains(left if words[1] == "left" else right, 4)
    if words[:3] == ["both", "images", "contain"]:
        return contains(left, 3) and contains(right, 3)
    if words[:4] == ["exactly", "one", "image", "contains"]:
        return contains(left, 4) != contains(right, 4)
    if words[:2] == ["there", "are"]:
        return len(left.objects) + len(right.objects) == NUMBERS.index(words[2])
    if statement == nlvr_statement("more", None, None):
        return len(left.objects) > len(right.objects)
    raise ValueError(f"not a statement of this world: {statement!r}")
