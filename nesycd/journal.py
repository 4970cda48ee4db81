"""Item journals: finished items of a long stage, appended one JSON line at a time so a resume can skip them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class ItemJournal:
    """A JSON-lines file of finished items of one stage, keyed by item id and tagged with the stage fingerprint.

    `append` writes and fsyncs one line per item, so an item that `append` returned for survives a
    crash or SIGKILL of the process. `finished()` returns the items of the current fingerprint;
    lines of another fingerprint (a stage whose inputs changed) and a torn last line are ignored.
    """

    def __init__(self, path: str | Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._tail_checked = False

    def finished(self) -> dict[str, Any]:
        """Return {item id: record} for the items this fingerprint finished; a later line wins."""
        if not self.path.exists():
            return {}
        items: dict[str, Any] = {}
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    # A SIGKILL during a write leaves a partial last line; its item runs again.
                    logger.warning("Ignoring unreadable line %d of journal %s", number, self.path)
                    continue
                if entry.get("fingerprint") == self.fingerprint:
                    items[entry["id"]] = entry["record"]
        return items

    def append(self, item_id: str, record: Any) -> None:
        """Append one finished item and fsync it to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"fingerprint": self.fingerprint, "id": item_id, "record": record}, default=str)
        if not self._tail_checked:
            # A torn last line gets its newline now, so that it cannot swallow the next record.
            line = self._separator() + line
            self._tail_checked = True
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _separator(self) -> str:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return ""
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return "" if handle.read(1) == b"\n" else "\n"
