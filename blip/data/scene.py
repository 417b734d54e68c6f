"""Scenes of the synthetic world: one to three coloured shapes on a 3x3 grid, rendered with PIL.

Each object sits in its own grid cell, so positions and relations ("to the left of", "above") are exact.
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SIZES = ("small", "large")
GRID = 3
EXTENT = {"small": 0.45, "large": 0.85}  # shape extent as a fraction of its cell
OBJECT_COUNT_WEIGHTS = (0.25, 0.45, 0.30)  # P(1, 2, 3 objects) before truncation to max_objects


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int  # 0 = top
    col: int  # 0 = left
    dx: float = 0.0  # jitter inside the cell, in [-1, 1] of the free space
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: int  # grey level

    def to_json(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_json(data: dict) -> Scene:
        return Scene(tuple(Obj(**o) for o in data["objects"]), data["background"])


def item_rng(seed: int, split: str, index: int) -> random.Random:
    # String seeds hash with SHA-512 inside `random`, so this is stable across processes and Python runs.
    return random.Random(f"{seed}/{split}/{index}")


def sample_scene(rng: random.Random, max_objects: int) -> Scene:
    weights = OBJECT_COUNT_WEIGHTS[:max_objects]
    count = rng.choices(range(1, max_objects + 1), weights=weights)[0]
    cells = rng.sample(range(GRID * GRID), count)
    objects = tuple(
        Obj(
            shape=rng.choice(SHAPES),
            colour=rng.choice(tuple(COLOURS)),
            size=rng.choice(SIZES),
            row=cell // GRID,
            col=cell % GRID,
            dx=round(rng.uniform(-1, 1), 3),
            dy=round(rng.uniform(-1, 1), 3),
        )
        for cell in sorted(cells)
    )
    return Scene(objects, background=rng.randint(20, 70))


def shape_box(obj: Obj, image_size: int) -> tuple[float, float, float, float]:
    """The bounding box (x0, y0, x1, y1) the object is drawn in."""
    cell = image_size / GRID
    extent = cell * EXTENT[obj.size]
    slack = max(0.0, (cell - extent) / 2 - 1.5)  # keep 1.5 px clear of the cell edge: no shape spills over
    cx = (obj.col + 0.5) * cell + obj.dx * slack
    cy = (obj.row + 0.5) * cell + obj.dy * slack
    return cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2


def render(scene: Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = shape_box(obj, image_size)
        fill = COLOURS[obj.colour]
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(xm, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    return image


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 chroma: the default 4:2:0 subsampling smears colour across the edges of small shapes.
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()
