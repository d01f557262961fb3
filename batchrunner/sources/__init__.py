"""Input sources: one reader per input kind, each yielding ``Batch``es in input order.

    tabular     CSV, Parquet and JSON lines, cut into batches of rows (``open_tabular``)

A source checks its input when it is opened (missing files and columns are ``InputError``s
before any request is sent), then streams: memory does not grow with the input's size.
"""

from __future__ import annotations

from batchrunner.sources.tabular import FORMATS, TabularSource, json_safe, open_tabular

__all__ = ["FORMATS", "TabularSource", "json_safe", "open_tabular"]
