"""Error types. Every error names the argument, what was expected and what was given."""


class RealmError(ValueError):
    """Base class: bad input detected before any device work."""


class UnsupportedModelError(RealmError):
    """An architecture, option or checkpoint feature we do not implement."""


class CheckpointError(RealmError):
    """A checkpoint that is malformed: missing/extra tensors, wrong shapes, truncated files."""


class ConfigError(UnsupportedModelError, CheckpointError):
    """A model configuration (``config.json``, GGUF metadata or ``ModelConfig`` fields) with a
    missing key, a value of the wrong type, or values that contradict each other. Both an
    ``UnsupportedModelError`` and a ``CheckpointError``, so code catching either sees it."""
