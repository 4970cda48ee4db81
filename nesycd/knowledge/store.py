"""Knowledge base stored in Qdrant (local folder, in memory or a server), searched by embedding similarity."""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge.embedder import Embedder
from nesycd.knowledge.entry import KnowledgeEntry, merge_provenance

if TYPE_CHECKING:
    from nesycd.knowledge.index import VectorIndex

logger = logging.getLogger(__name__)

MEMORY_LOCATION = ":memory:"
SIDECAR_NAME = "nesycd_kb.json"
SIDECAR_FORMAT = 1
URL_SCHEMES = ("http://", "https://")

# Cosine similarity of entry texts at or above which a new entry of the same task is merged into an existing one.
DEFAULT_DEDUP_THRESHOLD = 0.95
DEFAULT_SERVER_TIMEOUT_S = 10

# Keys of the nesycd record in the Qdrant collection's metadata.
_METADATA_EMBEDDER = "nesycd_embedder_id"
_METADATA_DIMENSION = "nesycd_dimension"

# Namespace of the uuid5 point ids derived from entry ids. Changing it would
# orphan the points of every existing knowledge base.
_POINT_ID_NAMESPACE = uuid.UUID("5b0c6a52-8f3e-4d7a-9c1e-2f64b7a1d0e3")
_SCROLL_PAGE = 256
_INDEX_LOAD_PAGE = 2048
_QUERY_CACHE_SIZE = 4096


def point_id(entry_id: str) -> str:
    """Return the Qdrant point id (a uuid5 string) of the entry with `entry_id`."""
    return str(uuid.uuid5(_POINT_ID_NAMESPACE, entry_id))


def is_server_url(location: object) -> bool:
    """Return whether `location` names a Qdrant server (an http:// or https:// URL)."""
    return isinstance(location, str) and location.strip().lower().startswith(URL_SCHEMES)


@dataclass
class Hit:
    """One search result: the entry, its cosine similarity to the query and its 1-based rank."""

    entry: KnowledgeEntry
    score: float
    rank: int


class KnowledgeStore:
    """Knowledge entries in one Qdrant collection, keyed by the embedding of `entry.key`.

    `location` is a folder (Qdrant local mode, created if missing), ":memory:", or the
    URL of a Qdrant server ("http://host:6333"). One location can hold several named
    collections, for example one per KB version. A folder can be open in only one store
    at a time, because Qdrant local mode locks it.

    The embedder id and vector size are stored in the collection's metadata and, for a
    folder, also in `nesycd_kb.json` inside it. Both are checked on every open. In local
    modes the store searches an in-process numpy index of the collection's vectors
    (`vector_index`), because qdrant-client's local search scans every point in Python.
    A server is searched with Qdrant's own query.

    `dedup_threshold` is the cosine similarity of entry texts at or above which `add` merges
    a new entry into an active entry of the same task (None turns merging off). `recreate`
    deletes an existing collection of that name first, without checking its embedder.
    With `create=False` a missing collection raises KnowledgeBaseError instead of being
    created. `timeout_s` is the server's request timeout, in seconds.
    """

    def __init__(
        self,
        location: str | Path,
        *,
        collection: str = "nesycd_kb",
        embedder: Embedder | None = None,
        dedup_threshold: float | None = DEFAULT_DEDUP_THRESHOLD,
        recreate: bool = False,
        create: bool = True,
        vector_index: bool | None = None,
        timeout_s: int = DEFAULT_SERVER_TIMEOUT_S,
    ) -> None:
        if not isinstance(collection, str) or not collection.strip():
            raise KnowledgeBaseError(f"Knowledge base collection name must be a non-empty string, got {collection!r}.")
        if embedder is not None and not isinstance(embedder, Embedder):
            raise KnowledgeBaseError(
                f"KnowledgeStore embedder must be an nesycd Embedder, got {type(embedder).__name__}. "
                "Wrap the model with nesycd.knowledge.Embedder(model)."
            )
        if dedup_threshold is not None and (
            isinstance(dedup_threshold, bool)
            or not isinstance(dedup_threshold, (int, float))
            or not 0.0 < dedup_threshold <= 1.0
        ):
            raise KnowledgeBaseError(
                f"KnowledgeStore dedup_threshold must be a cosine similarity in (0, 1] or None, "
                f"got {dedup_threshold!r}. Pass None to keep near-duplicate entries apart."
            )
        if not isinstance(timeout_s, int) or isinstance(timeout_s, bool) or timeout_s < 1:
            raise KnowledgeBaseError(f"KnowledgeStore timeout_s must be a positive integer, got {timeout_s!r}.")
        self._embedder = embedder if embedder is not None else Embedder()
        self._collection = collection
        self._dedup_threshold = None if dedup_threshold is None else float(dedup_threshold)
        self._timeout_s = timeout_s
        self._client: Any = None
        self._folder: Path | None = None
        self._url: str | None = None
        self._index: VectorIndex | None = None
        self._generation = 0
        self._lock = threading.RLock()
        self._query_cache: OrderedDict[str, list[float]] = OrderedDict()
        # Embeddings of entry texts, for near-duplicate checks; keyed by the text itself.
        self._text_cache: dict[str, list[float]] = {}

        if isinstance(location, str) and location == MEMORY_LOCATION:
            self._location = MEMORY_LOCATION
        elif is_server_url(location):
            self._url = str(location).strip().rstrip("/")
            self._location = self._url
        elif isinstance(location, (str, os.PathLike)) and str(location).strip():
            self._folder = Path(location).expanduser().resolve()
            self._location = str(self._folder)
        else:
            raise KnowledgeBaseError(
                f"Knowledge base location must be a folder path, ':memory:' or an http(s):// Qdrant URL, "
                f"got {location!r}."
            )
        if vector_index is None:
            vector_index = self._url is None
        if vector_index and self._url is not None:
            raise KnowledgeBaseError(
                f"KnowledgeStore vector_index=True needs a local folder or ':memory:', but {self._location!r} is a "
                "Qdrant server that other clients may change. Pass vector_index=None or False."
            )
        self._use_index = bool(vector_index)

        self._client = self._open_client()
        try:
            self._prepare_collection(recreate=recreate, create=create)
            if self._use_index:
                self._load_index()
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

        if self._url is not None:
            try:
                return QdrantClient(url=self._url, timeout=self._timeout_s, check_compatibility=False)
            except ValueError as error:
                raise KnowledgeBaseError(
                    f"Qdrant server URL {self._url!r} is invalid: {error}. Pass a URL such as http://127.0.0.1:6333."
                ) from error
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

    def _call(self, action: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one client call, turning a server's transport and HTTP errors into KnowledgeBaseError."""
        if self._url is None:
            return function(*args, **kwargs)
        import httpx
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            return function(*args, **kwargs)
        except (ResponseHandlingException, httpx.HTTPError, OSError) as error:
            cause = getattr(error, "source", None) or error
            raise KnowledgeBaseError(
                f"Failed to {action} on the Qdrant server at {self._url!r} (collection {self._collection!r}): "
                f"{type(cause).__name__}: {cause}. Start the server or pass the URL of a running one "
                "(--kb-url), or use a local KB folder."
            ) from error
        except UnexpectedResponse as error:
            raise KnowledgeBaseError(
                f"Qdrant server at {self._url!r} rejected the request to {action} (collection "
                f"{self._collection!r}) with HTTP {error.status_code}: {error.content[:200]!r}. "
                "Check the server's log and that its version supports collection metadata (Qdrant 1.16 or newer)."
            ) from error

    def _prepare_collection(self, *, recreate: bool, create: bool) -> None:
        from qdrant_client import models

        dimension = self._embedder.dimension
        exists = self._call("check the collection", self._client.collection_exists, self._collection)
        if exists and recreate:
            self._call("delete the collection", self._client.delete_collection, self._collection)
            logger.info("Deleted knowledge base collection %s in %s to recreate it", self._collection, self._location)
        elif exists:
            self._check_existing_collection(dimension)
            return
        elif not create:
            response = self._call("list the collections", self._client.get_collections)
            names = sorted(description.name for description in response.collections)
            raise KnowledgeBaseError(
                f"Knowledge base collection {self._collection!r} not found in {self._location!r}; "
                f"the collections there are {names}. Pass one of them, or create the collection first."
            )

        self._call(
            "create the collection",
            self._client.create_collection,
            self._collection,
            vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
            metadata={_METADATA_EMBEDDER: self._embedder.model_id, _METADATA_DIMENSION: dimension},
        )
        if self._folder is not None:
            self._write_sidecar_record({"embedder_id": self._embedder.model_id, "dimension": dimension})
        logger.info(
            "Created knowledge base collection %s in %s (dimension %d)", self._collection, self._location, dimension
        )

    def _check_existing_collection(self, dimension: int) -> None:
        info = self._call("read the collection", self._client.get_collection, self._collection)
        vectors = info.config.params.vectors
        stored_size = getattr(vectors, "size", None)
        recorded = self._read_record(info)

        mismatches = []
        if stored_size != dimension:
            mismatches.append(f"the collection stores vectors of size {stored_size}, the embedder makes {dimension}")
        if recorded is None:
            logger.warning(
                "Knowledge base %s collection %s has no embedder record (collection metadata or %s), "
                "so its embedder id cannot be checked",
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
                + ". Use the embedder the KB was built with, or rebuild the KB "
                "(`nesycd kb rebuild RUN` re-embeds the entries recorded in the run's traces)."
            )

    def _load_index(self) -> None:
        """Fill the in-process index from every point of the collection."""
        from nesycd.knowledge.index import VectorIndex

        index = VectorIndex(self._embedder.dimension)
        offset = None
        while True:
            records, offset = self._client.scroll(
                self._collection, limit=_INDEX_LOAD_PAGE, offset=offset, with_payload=True, with_vectors=True
            )
            if records:
                index.upsert(
                    [record.payload["id"] for record in records],
                    [record.vector for record in records],
                    [record.payload["task"] for record in records],
                    [record.payload.get("status", "active") for record in records],
                )
            if offset is None:
                break
        self._index = index

    # ----- embedder record -----

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

    def _read_record(self, info: Any) -> dict[str, Any] | None:
        """Return {embedder_id, dimension} from the folder's sidecar, else from the collection metadata."""
        if self._folder is not None:
            record = self._read_sidecar()["collections"].get(self._collection)
            if isinstance(record, dict):
                return record
        metadata = getattr(info.config, "metadata", None) or {}
        if _METADATA_EMBEDDER not in metadata:
            return None
        return {"embedder_id": metadata.get(_METADATA_EMBEDDER), "dimension": metadata.get(_METADATA_DIMENSION)}

    def _write_sidecar_record(self, record: dict[str, Any]) -> None:
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
        """Resolved folder path, ":memory:", or the server URL."""
        return self._location

    @property
    def is_server(self) -> bool:
        """Whether the store talks to a Qdrant server."""
        return self._url is not None

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
    def dedup_threshold(self) -> float | None:
        """Cosine similarity at or above which `add` merges near-duplicates, or None."""
        return self._dedup_threshold

    @property
    def generation(self) -> int:
        """Counter raised by every add and delete through this store, so retrievers can tell a stale index."""
        return self._generation

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

    def collections(self) -> list[str]:
        """Return the names of all collections at this location, sorted."""
        client = self._require_open()
        response = self._call("list the collections", client.get_collections)
        return sorted(description.name for description in response.collections)

    # ----- writing -----

    def add(
        self,
        entries: list[KnowledgeEntry],
        *,
        dedup: bool = True,
        vectors: Any = None,
    ) -> list[str]:
        """Embed each `entry.key`, upsert the entries, and return per entry the id of the stored entry that contains it.

        An entry whose id is already stored replaces it. A new entry may instead be
        merged, when `dedup` is true and the store has a `dedup_threshold`. It is merged
        into a stored active entry of the same task, or into an earlier entry of this
        call, whose text (learning summary and supplementary knowledge) has at least that
        cosine similarity to its own. The stored entry keeps its text and key and records
        the duplicate's example ids, failure ids and id (see `merge_provenance`). Merging
        embeds the texts too, so it roughly doubles the embedding work. `vectors` passes
        precomputed unit key vectors in place of embedding the keys.
        """
        client = self._require_open()
        self._check_entries(entries)
        if vectors is not None:
            vectors = self._check_vectors(vectors, len(entries))
        if not entries:
            return []
        if vectors is None:
            vectors = self._embed_keys(entries)

        existing = self._existing_ids([entry.id for entry in entries])
        with self._lock:
            if dedup and self._dedup_threshold is not None:
                to_upsert, upsert_vectors, holders, updated = self._merge_duplicates(entries, vectors, existing)
            else:
                to_upsert, upsert_vectors = list(entries), list(vectors)
                holders, updated = [entry.id for entry in entries], {}
            self._upsert(client, to_upsert, upsert_vectors)
            for entry in updated.values():
                self._call(
                    "update an entry",
                    client.overwrite_payload,
                    self._collection,
                    payload=entry.to_dict(),
                    points=[point_id(entry.id)],
                )
            self._generation += 1
        merged = len(entries) - len(to_upsert)
        logger.debug(
            "Added %d entries to knowledge base %s (%d merged into near-duplicates)", len(to_upsert), self._location, merged
        )
        if merged:
            logger.info("Merged %d near-duplicate entries into existing ones in %s", merged, self._location)
        return holders

    def _check_entries(self, entries: Any) -> None:
        if isinstance(entries, KnowledgeEntry) or not isinstance(entries, (list, tuple)):
            raise KnowledgeBaseError(
                f"KnowledgeStore.add expects a list of KnowledgeEntry, got {type(entries).__name__}. "
                "Wrap a single entry in a list."
            )
        seen: set[str] = set()
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
            if entry.id in seen:
                raise KnowledgeBaseError(
                    f"KnowledgeStore.add got the entry id {entry.id!r} twice (again at index {index}). "
                    "Give each entry its own id."
                )
            seen.add(entry.id)

    def _embed_keys(self, entries: list[KnowledgeEntry]) -> Any:
        import numpy as np

        return np.asarray(self._embed_texts([entry.key for entry in entries]), dtype=np.float32).reshape(len(entries), -1)

    def _check_vectors(self, vectors: Any, count: int) -> Any:
        import numpy as np

        matrix = np.asarray(vectors, dtype=np.float32)
        if count == 0 and matrix.size == 0:
            return matrix.reshape(0, self.dimension)
        if matrix.ndim != 2 or matrix.shape != (count, self.dimension):
            raise KnowledgeBaseError(
                f"KnowledgeStore.add got vectors of shape {matrix.shape}, expected ({count}, {self.dimension}): "
                "one vector of the collection's dimension per entry."
            )
        norms = np.linalg.norm(matrix, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            raise KnowledgeBaseError(
                "KnowledgeStore.add got vectors that are not unit length (norms from "
                f"{norms.min():.4f} to {norms.max():.4f}). Normalise them, as Embedder.embed does."
            )
        return matrix

    def _existing_ids(self, entry_ids: list[str]) -> set[str]:
        if self._index is not None:
            return {entry_id for entry_id in entry_ids if entry_id in self._index}
        records = self._call(
            "read entries",
            self._client.retrieve,
            self._collection,
            ids=[point_id(entry_id) for entry_id in entry_ids],
            with_payload=True,
        )
        return {record.payload["id"] for record in records}

    def _merge_duplicates(
        self, entries: list[KnowledgeEntry], vectors: Any, existing: set[str]
    ) -> tuple[list[KnowledgeEntry], list[Any], list[str], dict[str, KnowledgeEntry]]:
        """Split `entries` into entries to store and near-duplicates merged into stored or earlier entries.

        Two entries are near-duplicates when they have the same task and the embeddings of
        their text (learning summary and supplementary knowledge, the part inserted into
        prompts) have a cosine of at least the threshold. Their keys may differ. Returns the
        entries to upsert with their key vectors, the holder id of every input entry, and
        the stored entries whose provenance changed (by id).
        """
        import numpy as np

        from nesycd.knowledge.index import VectorIndex

        candidates = VectorIndex(self.dimension)
        for task in sorted({entry.task for entry in entries if entry.id not in existing}):
            stored = [entry for entry in self._active_entries(task) if entry.id not in existing]
            if stored:
                candidates.upsert(
                    [entry.id for entry in stored],
                    self._text_vectors(stored),
                    [entry.task for entry in stored],
                    [entry.status for entry in stored],
                )
        text_vectors = np.asarray(self._embed_texts([entry.text for entry in entries]), dtype=np.float32)

        to_upsert: list[KnowledgeEntry] = []
        upsert_vectors: list[Any] = []
        positions: dict[str, int] = {}
        holders: list[str] = []
        updated: dict[str, KnowledgeEntry] = {}
        for entry, vector, text_vector in zip(entries, vectors, text_vectors):
            target_id = None
            if entry.id not in existing:
                best = candidates.search(text_vector, 1, task=entry.task, status="active")
                if best and best[0][1] >= self._dedup_threshold:  # type: ignore[operator]
                    target_id = best[0][0]
            if target_id is None:
                positions[entry.id] = len(to_upsert)
                to_upsert.append(entry)
                upsert_vectors.append(vector)
                holders.append(entry.id)
                candidates.upsert([entry.id], [text_vector], [entry.task], [entry.status])
                continue

            if target_id in positions:
                position = positions[target_id]
                to_upsert[position] = merge_provenance(to_upsert[position], entry)
            else:
                holder = updated.get(target_id) or self.get(target_id)
                updated[target_id] = merge_provenance(holder, entry)
            holders.append(target_id)
            logger.debug("Entry %s merged into near-duplicate %s", entry.id, target_id)
        return to_upsert, upsert_vectors, holders, updated

    def _active_entries(self, task: str) -> list[KnowledgeEntry]:
        """Return the stored active entries of `task`."""
        from qdrant_client import models

        query_filter = models.Filter(
            must=[
                models.FieldCondition(key="task", match=models.MatchValue(value=task)),
                models.FieldCondition(key="status", match=models.MatchValue(value="active")),
            ]
        )
        result: list[KnowledgeEntry] = []
        offset = None
        while True:
            records, offset = self._call(
                "list entries",
                self._client.scroll,
                self._collection,
                scroll_filter=query_filter,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=True,
                with_vectors=False,
            )
            result.extend(KnowledgeEntry.from_dict(record.payload) for record in records)
            if offset is None:
                return result

    def _text_vectors(self, entries: list[KnowledgeEntry]) -> list[list[float]]:
        """Return the embeddings of the entries' texts, embedding only texts not seen before."""
        missing = [entry.text for entry in entries if entry.text not in self._text_cache]
        for text, vector in zip(missing, self._embed_texts(missing)):
            self._text_cache[text] = vector
        return [self._text_cache[entry.text] for entry in entries]

    def _embed_texts(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        batch_size = self._embedder.batch_size
        for start in range(0, len(texts), batch_size):
            vectors.extend(self._embedder.embed(texts[start : start + batch_size]))
        return vectors

    def _upsert(self, client: Any, entries: list[KnowledgeEntry], vectors: Any) -> None:
        import numpy as np
        from qdrant_client import models

        batch_size = max(self._embedder.batch_size, 256)
        for start in range(0, len(entries), batch_size):
            batch = entries[start : start + batch_size]
            batch_vectors = np.asarray(vectors[start : start + batch_size], dtype=np.float32)
            points = [
                models.PointStruct(id=point_id(entry.id), vector=vector, payload=entry.to_dict())
                for entry, vector in zip(batch, batch_vectors.tolist())
            ]
            self._call("write entries", client.upsert, self._collection, points=points)
            if self._index is not None:
                self._index.upsert(
                    [entry.id for entry in batch],
                    batch_vectors,
                    [entry.task for entry in batch],
                    [entry.status for entry in batch],
                )

    def update(self, entry: KnowledgeEntry) -> None:
        """Replace a stored entry and re-embed its key, without merging; raise KnowledgeBaseError if it is missing."""
        self.get(entry.id)
        self.add([entry], dedup=False)

    def delete(self, entry_id: str) -> None:
        """Delete the entry with `entry_id`, or raise KnowledgeBaseError if there is none."""
        from qdrant_client import models

        client = self._require_open()
        self.get(entry_id)
        with self._lock:
            self._call(
                "delete an entry",
                client.delete,
                self._collection,
                points_selector=models.PointIdsList(points=[point_id(entry_id)]),
            )
            if self._index is not None:
                self._index.remove(entry_id)
            self._generation += 1
        logger.debug("Deleted entry %s from knowledge base %s", entry_id, self._location)

    # ----- reading -----

    def embed_query(self, query: str) -> list[float]:
        """Return the unit vector of `query`, from a cache of recent queries when possible."""
        if not isinstance(query, str):
            raise KnowledgeBaseError(f"Knowledge base query must be a string, got {type(query).__name__}.")
        with self._lock:
            cached = self._query_cache.get(query)
            if cached is not None:
                self._query_cache.move_to_end(query)
                return cached
        vector = self._embedder.embed([query])[0]
        with self._lock:
            self._query_cache[query] = vector
            if len(self._query_cache) > _QUERY_CACHE_SIZE:
                self._query_cache.popitem(last=False)
        return vector

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
        self._require_open()
        if not isinstance(query, str):
            raise KnowledgeBaseError(f"Knowledge base query must be a string, got {type(query).__name__}.")
        self._check_search_options(k, min_score)
        return self.search_vector(self.embed_query(query), k=k, task=task, min_score=min_score, status=status)

    def search_vector(
        self,
        vector: list[float],
        *,
        k: int = 3,
        task: str | None = None,
        min_score: float | None = None,
        status: str | None = "active",
    ) -> list[Hit]:
        """Return up to `k` entries whose key embedding is closest to the unit vector `vector`, best first."""
        self._require_open()
        self._check_search_options(k, min_score)
        pairs = self._search_ids(vector, k=k, task=task, status=status)
        if min_score is not None:
            pairs = [(entry_id, score) for entry_id, score in pairs if score >= min_score]
        entries = self._entries_by_id([entry_id for entry_id, _ in pairs])
        return [
            Hit(entry=entries[entry_id], score=score, rank=rank)
            for rank, (entry_id, score) in enumerate(pairs, start=1)
        ]

    @staticmethod
    def _check_search_options(k: Any, min_score: Any) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise KnowledgeBaseError(f"Knowledge base search k must be a positive integer, got {k!r}.")
        if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float))):
            raise KnowledgeBaseError(f"Knowledge base search min_score must be a number or None, got {min_score!r}.")

    def _search_ids(
        self, vector: list[float], *, k: int, task: str | None, status: str | None
    ) -> list[tuple[str, float]]:
        """Return (entry id, cosine) pairs, best first, from the in-process index or from Qdrant."""
        if self._index is not None:
            with self._lock:
                return self._index.search(vector, k, task=task, status=status)
        return self._qdrant_search(vector, k=k, task=task, status=status)

    def _qdrant_search(
        self, vector: list[float], *, k: int, task: str | None, status: str | None
    ) -> list[tuple[str, float]]:
        from qdrant_client import models

        conditions = []
        if task is not None:
            conditions.append(models.FieldCondition(key="task", match=models.MatchValue(value=task)))
        if status is not None:
            conditions.append(models.FieldCondition(key="status", match=models.MatchValue(value=status)))
        query_filter = models.Filter(must=conditions) if conditions else None
        points = self._call(
            "search",
            self._client.query_points,
            self._collection,
            query=vector,
            limit=k,
            query_filter=query_filter,
            with_payload=["id"],
        ).points
        pairs = [(point.payload["id"], float(point.score)) for point in points]
        pairs.sort(key=lambda pair: (-pair[1], pair[0]))
        return pairs

    def _entries_by_id(self, entry_ids: list[str]) -> dict[str, KnowledgeEntry]:
        if not entry_ids:
            return {}
        records = self._call(
            "read entries",
            self._client.retrieve,
            self._collection,
            ids=[point_id(entry_id) for entry_id in entry_ids],
            with_payload=True,
        )
        found = {record.payload["id"]: KnowledgeEntry.from_dict(record.payload) for record in records}
        missing = [entry_id for entry_id in entry_ids if entry_id not in found]
        if missing:
            raise KnowledgeBaseError(
                f"Knowledge base {self._location!r} collection {self._collection!r} returned ids {missing} from a "
                "search but has no entries for them. Another client changed the collection; open the store again."
            )
        return found

    def get(self, entry_id: str) -> KnowledgeEntry:
        """Return the entry with `entry_id`, or raise KnowledgeBaseError if there is none."""
        client = self._require_open()
        if not isinstance(entry_id, str):
            raise KnowledgeBaseError(f"Knowledge entry id must be a string, got {type(entry_id).__name__}.")
        records = self._call(
            "read an entry", client.retrieve, self._collection, ids=[point_id(entry_id)], with_payload=True
        )
        if not records:
            raise KnowledgeBaseError(
                f"Knowledge entry {entry_id!r} not found in {self._location!r} collection {self._collection!r}. "
                "List the stored ids with KnowledgeStore.entries() or `nesycd kb list`."
            )
        return KnowledgeEntry.from_dict(records[0].payload)

    def entries(self) -> list[KnowledgeEntry]:
        """Return all entries, ordered by creation time and then id."""
        client = self._require_open()
        result: list[KnowledgeEntry] = []
        offset = None
        while True:
            records, offset = self._call(
                "list entries",
                client.scroll,
                self._collection,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=True,
                with_vectors=False,
            )
            result.extend(KnowledgeEntry.from_dict(record.payload) for record in records)
            if offset is None:
                break
        result.sort(key=lambda entry: (entry.created_at, entry.id))
        return result

    def count(self) -> int:
        """Return the number of stored entries."""
        client = self._require_open()
        return int(self._call("count entries", client.count, self._collection, exact=True).count)

    # ----- lifetime -----

    def close(self) -> None:
        """Close the Qdrant client and release the folder lock. Calling it again does nothing."""
        if self._client is None:
            return
        self._client.close()
        self._client = None
        self._index = None
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
