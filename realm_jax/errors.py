"""Error types. Every error names the argument, what was expected and what was given."""


class RealmError(ValueError):
    """Base class: bad input detected before any device work."""


class UnsupportedModelError(RealmError):
    """An architecture, option or checkpoint feature we do not implement."""


class CheckpointError(RealmError):
    """A checkpoint that is malformed: missing/extra tensors, wrong shapes, truncated files."""
