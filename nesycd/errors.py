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
