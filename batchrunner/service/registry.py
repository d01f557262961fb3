"""The embedded service's models by name: which there are, and loading one once.

Apart from ``models`` so that ``colors`` (which builds on ``models``) can be one of them
without an import cycle.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from batchrunner.service.llm import LabelModel
from batchrunner.service.models import DATA_DIR, IrisModel, LinearModel, Model, SentimentModel


def _load_iris() -> IrisModel:
    return IrisModel.fit_csv(DATA_DIR / "iris.csv")


def _load_colors() -> Model:
    from batchrunner.service.colors import ColorsModel  # Pillow, imported when needed

    return ColorsModel()


# One loader per model name.
_LOADERS: dict[str, Callable[[], Model]] = {
    "iris": _load_iris,
    "linear": LinearModel,
    "sentiment": SentimentModel,
    "colors": _load_colors,
    "llm": LabelModel,
}

MODEL_NAMES: tuple[str, ...] = tuple(_LOADERS)


def load_model(name: str) -> Model:
    """Return the fitted model called ``name`` (fitted once, then cached).

    Raises ValueError, listing the known names, when there is no such model.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown model {name!r}; the known models are: {', '.join(MODEL_NAMES)}")
    return _load_cached(name)


@functools.cache
def _load_cached(name: str) -> Model:
    return _LOADERS[name]()
