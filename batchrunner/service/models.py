"""The models behind the embedded reference service: what they are (``registry`` loads them).

A model is one of two kinds, matching the two input kinds of the protocol (``PROTOCOL.md``):

- a :class:`TextModel` scores the records of a text-input request (``data.req_data``) and
  returns one result object per record, in order;
- a :class:`FileModel` scores the one file of a file-input (multipart) request.

``iris`` (here) is a Gaussian naive Bayes classifier fitted at first use on the classic
150-row iris data set shipped in ``data/iris.csv``. It is plain Python on purpose (no
numpy): the service must run wherever batchrunner runs, and the per-record cost is a few
dozen float operations. ``colors`` (in ``colors.py``, loaded only when asked for, as it
needs Pillow) names the dominant colour of an image.
"""

from __future__ import annotations

import csv
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from os import PathLike
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"

IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
IRIS_LABEL = "species"
IRIS_RESULT_FIELD = "predictresult"

# The same smoothing as scikit-learn's GaussianNB: a tiny share of the largest feature
# variance is added to every class variance, so that a constant feature cannot divide by 0.
_VAR_SMOOTHING = 1e-9

# bool is a subclass of int, but True is not a petal length: only these types are numbers.
_NUMBER_TYPES = frozenset({int, float})


class ModelInputError(Exception):
    """A record the model cannot score: not an object, a missing feature, a non-number.

    The message names the record's index in ``req_data`` and the field; the service sends it
    back as the model's own error (``MR.0105``), and the whole request fails, as a deployed
    model's code would.
    """


class TextModel(ABC):
    """A model for text input: one result object per ``req_data`` record, in order."""

    name: str
    # The fields a record must hold, in order (a tensor's columns); None: any fields.
    features: tuple[str, ...] | None = None

    @abstractmethod
    def predict(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score ``records``; raise :class:`ModelInputError` if any of them is unfit."""


class FileModel(ABC):
    """A model for file input: one multipart file in, one result object out.

    ``input_name`` is the form field the file must come under (the vendor's examples use
    ``images``). ``predict_file`` may run in a worker thread: decoding a large image takes
    long enough to stall every other request if it ran on the event loop.
    """

    name: str
    input_name: str

    @abstractmethod
    def predict_file(self, filename: str, content: bytes) -> dict[str, Any]:
        """Score one file; raise :class:`ModelInputError` if it cannot be read."""


Model = TextModel | FileModel


@dataclass(frozen=True, slots=True)
class _ClassScore:
    """What one class contributes to a prediction, precomputed at fit time.

    The log-likelihood of a record x under the class is
    ``constant - sum(weight_i * (x_i - mean_i) ** 2)`` with ``weight_i = 1 / (2 var_i)`` and
    ``constant = log(prior) - sum(log(2 pi var_i)) / 2``: four subtractions and
    multiplications per feature at predict time, nothing else.
    """

    label: str
    constant: float
    means: tuple[float, float, float, float]
    weights: tuple[float, float, float, float]


class IrisModel(TextModel):
    """Gaussian naive Bayes over the four iris measurements; predicts the species.

    Each result echoes the request record's fields and adds ``predictresult``, as the
    vendor's iris example does.
    """

    name = "iris"

    features = IRIS_FEATURES

    def __init__(self, classes: Sequence[_ClassScore]) -> None:
        if not classes:
            raise ValueError("an IrisModel needs at least one class")
        self._classes = tuple(classes)
        # The same numbers, flattened for the hot loop: one tuple unpacking per class.
        self._table = tuple((c.label, c.constant, *c.means, *c.weights) for c in self._classes)

    @property
    def labels(self) -> tuple[str, ...]:
        """The species the model can predict, in the order they were first seen."""
        return tuple(c.label for c in self._classes)

    @classmethod
    def fit_csv(cls, path: str | PathLike[str]) -> IrisModel:
        """Fit the model on a CSV with the four feature columns and ``species``.

        Raises ValueError, naming the file and line, if a row lacks a column or holds a
        value that is not a number.
        """
        rows_by_label: dict[str, list[tuple[float, ...]]] = {}
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            header = reader.fieldnames or ()
            missing = [c for c in (*IRIS_FEATURES, IRIS_LABEL) if c not in header]
            if missing:
                raise ValueError(f"{path}: the header lacks the column(s) {', '.join(missing)}")
            for row in reader:
                try:
                    features = tuple(float(row[f]) for f in IRIS_FEATURES)
                except (TypeError, ValueError) as exc:
                    raise ValueError(
                        f"{path}, line {reader.line_num}: a feature is not a number ({exc})"
                    ) from exc
                rows_by_label.setdefault(row[IRIS_LABEL], []).append(features)
        if not rows_by_label:
            raise ValueError(f"{path}: no rows to fit on")
        return cls(_fit_gaussian_classes(rows_by_label))

    def predict(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return, for each record, its fields plus ``predictresult``: the likeliest species.

        Raises :class:`ModelInputError` for the first record that is not an object, lacks a
        feature, or holds a feature that is not a number.
        """
        table = self._table
        number_types = _NUMBER_TYPES
        results: list[dict[str, Any]] = []
        append = results.append
        # The hot loop (about 2 us a record): benchmarks push millions of rows through
        # it, so the checks are the cheapest that catch every bad record, and a readable
        # explanation is only built (by _explain_bad_record) once one has been found.
        for index, record in enumerate(records):
            if type(record) is not dict:
                raise _explain_bad_record(index, record)
            try:
                a = record["sepal_length"]
                b = record["sepal_width"]
                c = record["petal_length"]
                d = record["petal_width"]
            except KeyError:
                raise _explain_bad_record(index, record) from None
            if (
                type(a) not in number_types
                or type(b) not in number_types
                or type(c) not in number_types
                or type(d) not in number_types
            ):
                raise _explain_bad_record(index, record)
            best_label = table[0][0]
            best_score = -math.inf
            try:
                for label, constant, ma, mb, mc, md, wa, wb, wc, wd in table:
                    da = a - ma
                    db = b - mb
                    dc = c - mc
                    dd = d - md
                    score = constant - wa * da * da - wb * db * db - wc * dc * dc - wd * dd * dd
                    if score > best_score:
                        best_score, best_label = score, label
            except OverflowError:
                # An integer too large for a float (JSON allows any size).
                raise ModelInputError(
                    f"req_data[{index}]: a feature is too large to be a measurement"
                ) from None
            result = dict(record)
            result[IRIS_RESULT_FIELD] = best_label
            append(result)
        return results


def _fit_gaussian_classes(
    rows_by_label: Mapping[str, Sequence[tuple[float, ...]]],
) -> list[_ClassScore]:
    total = sum(len(rows) for rows in rows_by_label.values())
    stats: list[tuple[str, int, list[float], list[float]]] = []
    for label, rows in rows_by_label.items():
        n = len(rows)
        means = [math.fsum(column) / n for column in zip(*rows, strict=True)]
        # Maximum-likelihood variance (divide by n), as GaussianNB does.
        variances = [
            math.fsum((x - mean) ** 2 for x in column) / n
            for column, mean in zip(zip(*rows, strict=True), means, strict=True)
        ]
        stats.append((label, n, means, variances))
    epsilon = _VAR_SMOOTHING * max(v for _, _, _, variances in stats for v in variances)
    if epsilon == 0:
        epsilon = _VAR_SMOOTHING  # every feature constant in every class: still no 1/0
    classes = []
    for label, n, means, variances in stats:
        smoothed = [v + epsilon for v in variances]
        log_norm = math.fsum(math.log(2 * math.pi * v) for v in smoothed)
        constant = math.log(n / total) - 0.5 * log_norm
        classes.append(
            _ClassScore(
                label=label,
                constant=constant,
                means=(means[0], means[1], means[2], means[3]),
                weights=(
                    _half_inverse(smoothed[0]),
                    _half_inverse(smoothed[1]),
                    _half_inverse(smoothed[2]),
                    _half_inverse(smoothed[3]),
                ),
            )
        )
    return classes


def _half_inverse(variance: float) -> float:
    return 1 / (2 * variance)


def _explain_bad_record(index: int, record: object) -> ModelInputError:
    """Say what is wrong with a record the fast path refused (the slow, readable path)."""
    where = f"req_data[{index}]"
    if not isinstance(record, dict):
        return ModelInputError(f"{where}: a record must be a JSON object, got {_json_type(record)}")
    for field in IRIS_FEATURES:
        if field not in record:
            return ModelInputError(f"{where}: the field '{field}' is missing")
        value = record[field]
        if type(value) not in _NUMBER_TYPES:
            return ModelInputError(
                f"{where}: the field '{field}' must be a number, got {_json_type(value)}"
            )
    return ModelInputError(f"{where}: the record cannot be scored")


def _json_type(value: object) -> str:
    """Name a value's type as JSON does, for messages sent back to a client."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


class LinearModel(TextModel):
    """A linear score of every numeric field: the cheapest real model, for throughput runs.

    ``score = 0.5 * sum(numbers) + 1``; fields that are not numbers are ignored, so any
    table can be scored. The answer holds only ``score``, as services that do not echo
    their inputs answer.
    """

    name = "linear"

    def predict(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if records and set(map(type, records)) != {dict}:
            position, record = next(
                (i, r) for i, r in enumerate(records) if not isinstance(r, dict)
            )
            raise ModelInputError(
                f"req_data[{position}]: a record must be a JSON object, got {_json_type(record)}"
            )
        numbers = _NUMBER_TYPES
        if set(map(type, chain.from_iterable(map(dict.values, records)))) <= numbers:
            # Numbers only (the benchmark's tables): summed in C, no per-value test.
            return [{"score": 0.5 * sum(record.values()) + 1.0} for record in records]
        return [
            {"score": 0.5 * sum([v for v in record.values() if type(v) in numbers]) + 1.0}
            for record in records
        ]


class SentimentModel(TextModel):
    """Whether a short text is positive or negative, by counting words from two small
    lists: the custom text body's model (``{"input": "..."}``). Answers ``label``
    (positive, negative or neutral) and ``score`` (positive words less negative ones)."""

    name = "sentiment"
    features = ("text",)
    _POSITIVE = frozenset(
        ["good", "great", "excellent", "love", "loved", "lovely", "nice", "fine", "happy", "best"]
    )
    _NEGATIVE = frozenset(
        ["bad", "poor", "awful", "hate", "hated", "terrible", "worst", "broken", "sad", "late"]
    )

    def predict(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for index, record in enumerate(records):
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ModelInputError(
                    f"req_data[{index}]: 'text' must be a string, got {_json_type(text)}"
                )
            words = [word.strip(".,!?;:").lower() for word in text.split()]
            score = sum(w in self._POSITIVE for w in words) - sum(
                w in self._NEGATIVE for w in words
            )
            label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
            results.append({"label": label, "score": score})
        return results
