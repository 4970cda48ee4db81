"""Knowledge base stored in Qdrant (local folder or in memory), searched by embedding similarity."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge.embedder import Embedder
from nesycd.knowledge.entry import KnowledgeEntry

logger = logging.getLogger(__name__)

MEMORY_LOCATION = ":memory:"
SIDECAR_NAME = "nesycd_kb.json"
SIDECAR_FORMAT = 1

# Namespace of the uuid5 point ids derived from entry ids. Changing it would
# orphan the points of every existing knowledge base.
_POINT_ID_NAMESPACE = uuid.UUID("5b0c6a52-8f3e-4d7a-9c1e-2f64b7a1d0e3")
_SCROLL_PAGE = 256


def point_id(entry_id: str) -> str:
    """Return the Qdrant point id (a uuid5 string) of the entry with `entry_id`."""
    return str(uuid.uuid5(_POINT_ID_NAMESPACE, entry_id))


@dataclass
class Hit:
    """One search result: the entry, its cosine similarity to the query and its 1-based rank."""

    entry: KnowledgeEntry
    score: float
    rank: int


class KnowledgeStore:
    """Knowledge entries in one Qdrant collection, keyed by the embedding of `entry.key`.

    `location` is a folder (Qdrant local mode, created if missing) or ":memory:".
    A folder can be open in only one store at a time, because Qdrant local mode
    locks it. The embedder id and vector size are recorded in `nesycd_kb.json`
    inside the folder and checked on every open.
    """

    def __init__(
        self,
        location: str | Path,
        *,
        collection: str = "nesycd_kb",
        embedder: Embedder | None = None,
    ) -> None:
        if not isinstance(collection, str) or not collection.strip():
            raise KnowledgeBaseError(f"Knowledge base collection name must be a non-empty string, got {collection!r}.")
        if embedder is not None and not isinstance(embedder, Embedder):
            raise KnowledgeBaseError(
                f"KnowledgeStore embedder must be an nesycd Embedder, got {type(embedder).__name__}. "
                "Wrap the model with nesycd.knowledge.Embedder(model)."
            )
        self._embedder = embedder if embedder is not None else Embedder()
        self._collection = collection
        self._client: Any = None
        self._memory_metadata: dict[str, dict[str, Any]] = {}

        if isinstance(location, str) and location == MEMORY_LOCATION:
            self._folder: Path | None = None
            self._location = MEMORY_LOCATION
        elif isinstance(location, (str, os.PathLike)) and str(location).strip():
            self._folder = Path(location).expanduser().resolve()
            self._location = str(self._folder)
        else:
            raise KnowledgeBaseError(
                f"Knowledge base location must be a folder path or ':memory:', got {location!r}."
            )

        self._client = self._open_client()
        try:
            self._prepare_collection()
        except BaseException:
            self._client.close()
            self._client = None
            raise
        logger.info(
            "Opened knowledge base %s collection %s (%d entries, embedder %s)",
            self._location,
            self._collection,
            self.count(),
            self._embedder.model_id,
        )

    # ----- opening -----

    def _open_client(self) -> Any:
        from qdrant_client import QdrantClient

        if self._folder is None:
            return QdrantClient(location=MEMORY_LOCATION)

        if self._folder.exists() and not self._folder.is_dir():
            raise KnowledgeBaseError(
                f"Knowledge base location {self._location!r} is a file. Pass a folder path or ':memory:'."
            )
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KnowledgeBaseError(
                f"Failed to create the knowledge base folder {self._location!r}: {error}. "
                "Pass a writable folder path."
            ) from error
        try:
            return QdrantClient(path=str(self._folder))
        except RuntimeError as error:
            # qdrant-client 1.20 raises RuntimeError("Storage folder ... is already accessed
            # by another instance of Qdrant client") when the folder lock is held, including
            # by another client in this process.
            if "already accessed" in str(error):
                raise KnowledgeBaseError(
                    f"Knowledge base folder {self._location!r} is already open in another Qdrant client "
                    "(another KnowledgeStore, possibly in this process, or another process). Close that store "
                    "or stop that process, or open a copy of the folder."
                ) from error
            raise KnowledgeBaseError(
                f"Failed to open the knowledge base folder {self._location!r} with Qdrant: {error}."
            ) from error

    def _prepare_collection(self) -> None:
        from qdrant_client import models

        dimension = self._embedder.dimension
        if self._client.collection_exists(self._collection):
            self._check_existing_collection(dimension)
            return

        self._client.create_collection(
            self._collection,
            vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
        )
        self._write_metadata({"embedder_id": self._embedder.model_id, "dimension": dimension})
        logger.info(
            "Created knowledge base collection %s in %s (dimension %d)", self._collection, self._location, dimension
        )

    def _check_existing_collection(self, dimension: int) -> None:
        info = self._client.get_collection(self._collection)
        vectors = info.config.params.vectors
        stored_size = getattr(vectors, "size", None)
        recorded = self._read_metadata()

        mismatches = []
        if stored_size != dimension:
            mismatches.append(f"the collection stores vectors of size {stored_size}, the embedder makes {dimension}")
        if recorded is None:
            logger.warning(
                "Knowledge base %s collection %s has no record in %s, so its embedder id cannot be checked",
                self._location,
                self._collection,
                SIDECAR_NAME,
            )
        else:
            if recorded.get("embedder_id") != self._embedder.model_id:
                mismatches.append(
                    f"it was built with embedder {recorded.get('embedder_id')!r}, "
                    f"the current embedder is {self._embedder.model_id!r}"
                )
            if recorded.get("dimension") != dimension:
                mismatches.append(
                    f"it records dimension {recorded.get('dimension')!r}, the current embedder makes {dimension}"
                )
        if mismatches:
            raise KnowledgeBaseError(
                f"Knowledge base {self._location!r} collection {self._collection!r} does not match the embedder: "
                + "; ".join(mismatches)
                + ". Use the embedder the KB was built with, or rebuild the KB."
            )

    # ----- sidecar metadata -----

    def _sidecar_path(self) -> Path:
        return self._folder / SIDECAR_NAME  # type: ignore[operator]

    def _read_sidecar(self) -> dict[str, Any]:
        path = self._sidecar_path()
        if not path.exists():
            return {"format": SIDECAR_FORMAT, "collections": {}}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise KnowledgeBaseError(
                f"Failed to read the knowledge base record {str(path)!r}: {error}. "
                "Restore the file from a copy of the KB, or rebuild the KB."
            ) from error
        if not isinstance(data, dict) or not isinstance(data.get("collections"), dict):
            raise KnowledgeBaseError(
                f"Knowledge base record {str(path)!r} is malformed (expected a JSON object with 'collections'). "
                "Restore the file from a copy of the KB, or rebuild the KB."
            )
        return data

    def _read_metadata(self) -> dict[str, Any] | None:
        if self._folder is None:
            return self._memory_metadata.get(self._collection)
        record = self._read_sidecar()["collections"].get(self._collection)
        return record if isinstance(record, dict) else None

    def _write_metadata(self, record: dict[str, Any]) -> None:
        if self._folder is None:
            self._memory_metadata[self._collection] = dict(record)
            return
        data = self._read_sidecar()
        data["format"] = SIDECAR_FORMAT
        data["collections"][self._collection] = dict(record)
        path = self._sidecar_path()
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, path)

    # ----- properties -----

    @property
    def location(self) -> str:
        """Resolved folder path, or ":memory:"."""
        return self._location

    @property
    def collection(self) -> str:
        """Qdrant collection name."""
        return self._collection

    @property
    def embedder(self) -> Embedder:
        """Embedder used for keys and queries."""
        return self._embedder

    @property
    def embedder_id(self) -> str:
        """Model id of the embedder."""
        return self._embedder.model_id

    @property
    def dimension(self) -> int:
        """Vector size of the collection."""
        return self._embedder.dimension

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._client is None

    def _require_open(self) -> Any:
        if self._client is None:
            raise KnowledgeBaseError(
                f"Knowledge base {self._location!r} collection {self._collection!r} is closed. "
                "Open a new KnowledgeStore on the same location."
            )
        return self._client

    # ----- writing -----

    def add(self, entries: list[KnowledgeEntry]) -> None:
        """Embed each `entry.key` and upsert the entries, replacing a stored entry with the same id."""
        from qdrant_client import models

        client = self._require_open()
        if isinstance(entries, KnowledgeEntry) or not isinstance(entries, (list, tuple)):
            raise KnowledgeBaseError(
                f"KnowledgeStore.add expects a list of KnowledgeEntry, got {type(entries).__name__}. "
                "Wrap a single entry in a list."
            )
        for index, entry in enumerate(entries):
            if not isinstance(entry, KnowledgeEntry):
                raise KnowledgeBaseError(
                    f"KnowledgeStore.add got a {type(entry).__name__} at index {index}. "
                    "Build entries with KnowledgeEntry(...) or KnowledgeEntry.from_dict(...)."
                )
            if not entry.key.strip():
                raise KnowledgeBaseError(
                    f"Knowledge entry {entry.id!r} has an empty key, so it could never be retrieved. "
                    "Set key to the task description followed by the question of the error case."
                )

        batch_size = self._embedder.batch_size
        for start in range(0, len(entries), batch_size):
            batch = entries[start : start + batch_size]
            vectors = self._embedder.embed([entry.key for entry in batch])
            points = [
                models.PointStruct(id=point_id(entry.id), vector=vector, payload=entry.to_dict())
                for entry, vector in zip(batch, vectors)
            ]
            client.upsert(self._collection, points=points)
        logger.debug("Added %d entries to knowledge base %s", len(entries), self._location)

    def delete(self, entry_id: str) -> None:
        """Delete the entry with `entry_id`, or raise KnowledgeBaseError if there is none."""
        from qdrant_client import models

        client = self._require_open()
        self.get(entry_id)
        client.delete(self._collection, points_selector=models.PointIdsList(points=[point_id(entry_id)]))
        logger.debug("Deleted entry %s from knowledge base %s", entry_id, self._location)

    # ----- reading -----

    def search(
        self,
        query: str,
        *,
        k: int = 3,
        task: str | None = None,
        min_score: float | None = None,
        status: str | None = "active",
    ) -> list[Hit]:
        """Return up to `k` entries whose key is most similar to `query`, best first.

        `task` keeps only entries of that task, `min_score` drops hits with a
        lower cosine similarity, and `status` keeps only entries with that
        status (None keeps all).
        """
        from qdrant_client import models

        client = self._require_open()
        if not isinstance(query, str):
            raise KnowledgeBaseError(f"Knowledge base query must be a string, got {type(query).__name__}.")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise KnowledgeBaseError(f"Knowledge base search k must be a positive integer, got {k!r}.")
        if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float))):
            raise KnowledgeBaseError(f"Knowledge base search min_score must be a number or None, got {min_score!r}.")

        conditions = []
        if task is not None:
            conditions.append(models.FieldCondition(key="task", match=models.MatchValue(value=task)))
        if status is not None:
            conditions.append(models.FieldCondition(key="status", match=models.MatchValue(value=status)))
        query_filter = models.Filter(must=conditions) if conditions else None

        vector = self._embedder.embed([query])[0]
        points = client.query_points(
            self._collection,
            query=vector,
            limit=k,
            query_filter=query_filter,
            with_payload=True,
        ).points

        scored = [(float(point.score), KnowledgeEntry.from_dict(point.payload)) for point in points]
        if min_score is not None:
            scored = [(score, entry) for score, entry in scored if score >= min_score]
        scored.sort(key=lambda pair: pair[0], reverse=True)
        return [Hit(entry=entry, score=score, rank=rank) for rank, (score, entry) in enumerate(scored, start=1)]

    def get(self, entry_id: str) -> KnowledgeEntry:
        """Return the entry with `entry_id`, or raise KnowledgeBaseError if there is none."""
        client = self._require_open()
        if not isinstance(entry_id, str):
            raise KnowledgeBaseError(f"Knowledge entry id must be a string, got {type(entry_id).__name__}.")
        records = client.retrieve(self._collection, ids=[point_id(entry_id)], with_payload=True)
        if not records:
            raise KnowledgeBaseError(
                f"Knowledge entry {entry_id!r} not found in {self._location!r} collection {self._collection!r}. "
                "List the stored ids with KnowledgeStore.entries()."
            )
        return KnowledgeEntry.from_dict(records[0].payload)

    def entries(self) -> list[KnowledgeEntry]:
        """Return all entries, ordered by creation time and then id."""
        client = self._require_open()
        result: list[KnowledgeEntry] = []
        offset = None
        while True:
            records, offset = client.scroll(
                self._collection, limit=_SCROLL_PAGE, offset=offset, with_payload=True, with_vectors=False
            )
            result.extend(KnowledgeEntry.from_dict(record.payload) for record in records)
            if offset is None:
                break
        result.sort(key=lambda entry: (entry.created_at, entry.id))
        return result

    def count(self) -> int:
        """Return the number of stored entries."""
        client = self._require_open()
        return int(client.count(self._collection, exact=True).count)

    # ----- lifetime -----

    def close(self) -> None:
        """Close the Qdrant client and release the folder lock. Calling it again does nothing."""
        if self._client is None:
            return
        self._client.close()
        self._client = None
        logger.debug("Closed knowledge base %s", self._location)

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __deepcopy__(self, memo: dict[int, Any]) -> KnowledgeStore:
        # The store is an open resource, not program state: dspy deep-copies
        # programs during optimisation, and every copy must share this store.
        return self

    def __reduce__(self) -> Any:
        raise KnowledgeBaseError(
            f"KnowledgeStore {self._location!r} cannot be pickled because it contains an open Qdrant client. "
            "Save the program state with program.save('state.json') and bind the store again after loading."
        )

    def __repr__(self) -> str:
        state = "closed" if self._client is None else "open"
        return (
            f"KnowledgeStore(location={self._location!r}, collection={self._collection!r}, "
            f"embedder_id={self._embedder.model_id!r}, {state})"
        )
