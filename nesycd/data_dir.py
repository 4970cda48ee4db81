"""Resolution of the data directory that contains the benchmark folders (bbh/, gsm8k/, ...)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nesycd.errors import DataError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "NESYCD_DATA_DIR"

_DATA_DIR_HINT = f"Pass --data-dir DIR or set {DATA_DIR_ENV} to the folder that contains bbh/, gsm8k/, ..."


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """Return the data directory: ``explicit`` when given, else the ``NESYCD_DATA_DIR`` variable.

    An empty string counts as not set. A leading "~" is expanded.

    Raises:
        DataError: neither is set, or the chosen path is not an existing directory.
    """
    if explicit is not None and str(explicit) != "":
        raw_value, source = str(explicit), "the given data directory"
    else:
        raw_value, source = os.environ.get(DATA_DIR_ENV, ""), DATA_DIR_ENV
        if raw_value == "":
            raise DataError(f"No data directory is set. {_DATA_DIR_HINT}")

    path = Path(raw_value).expanduser()
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"Data directory {raw_value!r} ({source}) {problem}. {_DATA_DIR_HINT}")

    logger.debug("Using data directory %s from %s", path, source)
    return path
