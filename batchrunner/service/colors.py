"""The ``colors`` model: the dominant colour of an image, answered like an image classifier.

A real model on real images, small enough to ship: it decodes the file with Pillow, reduces
it to at most 64x64 pixels, and counts the pixels of each colour name (transparent pixels
count for nothing), answering as the vendor's image classifiers do::

    {"predicted_label": "red", "scores": [["red", 0.93], ["white", 0.05], ...]}

``scores`` lists every label, the likeliest first; a score is the share of the image's
(visible) pixels of that colour. A file Pillow cannot decode is a ``ModelInputError``: the
service answers it with a model error (``MR.0105``), as a deployed model's code would.
"""

from __future__ import annotations

import colorsys
import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from batchrunner.service.models import FileModel, ModelInputError

#: The labels, in the order ties are broken.
COLOR_LABELS = ("red", "yellow", "green", "cyan", "blue", "magenta", "white", "gray", "black")

_SAMPLE_SIDE = 64  # pixels per side counted: enough for a dominant colour, cheap for a photo
_CHANNEL_BITS = 4  # colours are counted on a 16-level grid per channel: 4,096 buckets
_SCORE_DIGITS = 4

# Thresholds on HSV (each in 0..1): darker than _BLACK_V is black; paler than _GRAY_S is
# white (when bright) or gray; anything else is named by its hue's sixth of the circle.
_BLACK_V = 0.2
_GRAY_S = 0.2
_WHITE_V = 0.8
_HUES = ("red", "yellow", "green", "cyan", "blue", "magenta")  # centred on 0, 60, ... 300 deg


def color_name(red: int, green: int, blue: int) -> str:
    """The label of one colour (channels 0..255)."""
    hue, saturation, value = colorsys.rgb_to_hsv(red / 255, green / 255, blue / 255)
    if value < _BLACK_V:
        return "black"
    if saturation < _GRAY_S:
        return "white" if value > _WHITE_V else "gray"
    sector = int((hue * 360 + 30) // 60) % 6  # red spans 330..30 degrees
    return _HUES[sector]


def _bucket_labels() -> tuple[int, ...]:
    """The label index of every bucket of the colour grid, named at the bucket's centre."""
    levels = 1 << _CHANNEL_BITS
    width = 256 // levels
    index = {label: position for position, label in enumerate(COLOR_LABELS)}
    return tuple(
        index[color_name(r * width + width // 2, g * width + width // 2, b * width + width // 2)]
        for r in range(levels)
        for g in range(levels)
        for b in range(levels)
    )


class ColorsModel(FileModel):
    """Classifies an image by its dominant colour among ``COLOR_LABELS``."""

    name = "colors"
    input_name = "images"

    def __init__(self) -> None:
        # Naming a colour costs a few microseconds; naming 4,096 buckets once makes every
        # pixel count a table lookup.
        self._bucket_labels = _bucket_labels()

    def predict_file(self, filename: str, content: bytes) -> dict[str, Any]:
        """``{"predicted_label": ..., "scores": [[label, share], ...]}`` of an image file.

        Raises ``ModelInputError`` when the file is not an image Pillow can decode.
        """
        pixels = _decode(filename, content)
        shift = 8 - _CHANNEL_BITS
        levels = 1 << _CHANNEL_BITS
        weights = [0.0] * len(COLOR_LABELS)
        counts = [0] * len(COLOR_LABELS)
        # An RGBA image of at most _SAMPLE_SIDE squared pixels has at most as many colours.
        colors = pixels.getcolors(_SAMPLE_SIDE * _SAMPLE_SIDE) or []
        for count, color in colors:
            red, green, blue, alpha = color  # type: ignore[misc]  # RGBA: always 4 channels
            bucket = ((red >> shift) * levels + (green >> shift)) * levels + (blue >> shift)
            label = self._bucket_labels[bucket]
            weights[label] += count * alpha
            counts[label] += count
        total = sum(weights)
        if total == 0:  # wholly transparent: fall back to the colours under the transparency
            weights = [float(count) for count in counts]
            total = sum(weights)
        ranked = sorted(range(len(COLOR_LABELS)), key=lambda label: -weights[label])
        scores = [[COLOR_LABELS[i], round(weights[i] / total, _SCORE_DIGITS)] for i in ranked]
        return {"predicted_label": scores[0][0], "scores": scores}


def _decode(filename: str, content: bytes) -> Image.Image:
    """The image as RGBA, at most ``_SAMPLE_SIDE`` pixels a side."""
    what = repr(filename) if filename else "the file"
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.draft("RGB", (_SAMPLE_SIDE, _SAMPLE_SIDE))  # JPEG: decode at a reduced scale
            image.thumbnail((_SAMPLE_SIDE, _SAMPLE_SIDE))
            return image.convert("RGBA")
    except UnidentifiedImageError:
        raise ModelInputError(f"{what} is not an image (its format cannot be identified)") from None
    except Exception as exc:
        # Pillow's decoders raise many kinds of errors for a damaged file (OSError,
        # SyntaxError, ValueError, EOFError, ...): all of them mean the input is bad.
        raise ModelInputError(f"{what} cannot be decoded as an image: {exc}") from None
