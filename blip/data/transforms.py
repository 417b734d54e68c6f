"""BLIP's image transforms: RandomResizedCrop (bicubic), horizontal flip, RandomAugment(N, M), CLIP mean/std."""

from __future__ import annotations

import math

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms

from blip.config.schema import AugmentConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LEVEL = 10
FILL = (128, 128, 128)  # what shears, translations and rotations uncover


class RandomAugment:
    """BLIP's RandomAugment: N ops drawn from its ten, each applied with probability 0.5 at magnitude M.

    Magnitudes follow BLIP: enhance factor (M/10)*1.8+0.1 (so 1.0, a no-op, at M=5, as in BLIP), shear
    (M/10)*0.3, translation (M/10)*10 px, rotation (M/10)*30 degrees, each with a random sign.
    """

    OPS = (
        "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    )  # fmt: skip

    def __init__(self, n: int, m: int, generator: torch.Generator | None = None) -> None:
        self.n, self.level = n, m / MAX_LEVEL
        # torch's RNG (as torchvision's transforms): the data loader seeds it per sample for exact resume.
        self.generator = generator

    def _uniform(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def _signed(self, value: float) -> float:
        return value if self._uniform() < 0.5 else -value

    def apply(self, name: str, image: Image.Image) -> Image.Image:
        level = self.level
        if name == "Identity":
            return image
        if name == "AutoContrast":
            return ImageOps.autocontrast(image)
        if name == "Equalize":
            return ImageOps.equalize(image)
        if name in ("Brightness", "Sharpness"):
            enhancer = ImageEnhance.Brightness if name == "Brightness" else ImageEnhance.Sharpness
            return enhancer(image).enhance(level * 1.8 + 0.1)
        if name in ("ShearX", "ShearY"):
            degrees = math.degrees(math.atan(self._signed(level * 0.3)))
            shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
            return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, fill=list(FILL))
        if name in ("TranslateX", "TranslateY"):
            offset = round(self._signed(level * 10))
            shift = [offset, 0] if name == "TranslateX" else [0, offset]
            return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], fill=list(FILL))
        return TF.rotate(image, self._signed(level * 30), fill=list(FILL))  # Rotate

    def __call__(self, image: Image.Image) -> Image.Image:
        for index in torch.randint(len(self.OPS), (self.n,), generator=self.generator).tolist():
            if self._uniform() < 0.5:
                image = self.apply(self.OPS[index], image)
        return image


def train_transform(image_size: int, augment: AugmentConfig) -> transforms.Compose:
    steps: list = [
        transforms.RandomResizedCrop(
            image_size, scale=augment.crop_scale, interpolation=transforms.InterpolationMode.BICUBIC
        )
    ]
    if augment.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if augment.randaugment_n:
        steps.append(RandomAugment(augment.randaugment_n, augment.randaugment_m))
    steps += [transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)]
    return transforms.Compose(steps)


def eval_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
