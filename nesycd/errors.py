"""The error taxonomy: every error nesycd raises on purpose derives from NesycdError."""


class NesycdError(Exception):
    """Base class of the errors nesycd raises on purpose; the message names the value and the fix."""


class ConfigError(NesycdError):
    """An option or setting is invalid."""


class DataError(NesycdError):
    """A data directory or data file is missing or malformed."""


class ProgramError(NesycdError):
    """A program file cannot be loaded or lacks something the optimizer needs."""


class ModelError(NesycdError):
    """A model name cannot be resolved or its weights cannot be loaded."""


class TeacherError(NesycdError):
    """The teacher LM failed or returned output that cannot be used."""


class KnowledgeBaseError(NesycdError):
    """The knowledge base (entries, embedder or Qdrant store) is invalid or unreachable."""


class TraceStoreError(NesycdError):
    """The DuckDB trace store cannot be written or read."""


class TrainingError(NesycdError):
    """A fine-tuning job cannot start or failed."""


class ArtifactError(NesycdError):
    """A compiled artifact is missing, incomplete or does not match its manifest."""


class DiskFullError(NesycdError):
    """A write failed because the disk (or the file-size limit) is full."""


# errno values of a full disk (ENOSPC), a full quota (EDQUOT) and a file-size limit (EFBIG), and the
# texts that libraries put in errors that do not keep the OSError: SQLite (Qdrant's local mode),
# DuckDB and torch.save.
_DISK_FULL_ERRNOS = {28, 122, 27}
_DISK_FULL_TEXTS = ("no space left on device", "database or disk is full", "file too large", "disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """Return True when `error`, or an error in its cause or context chain, reports a full disk."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _DISK_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False
