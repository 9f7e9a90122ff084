"""The one exception the data pipeline raises for bad input.

A ``DataError`` is a user error, not a bug: its message says where (``data/train.jsonl:17`` for a
JSONL line, ``data/train.json row 3`` for a JSON / parquet / ``datasets`` row) and which field, so
the CLI prints it as one line (``data error: ...``) without a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad or unusable training data; the message names the file, the row / line and the field."""
