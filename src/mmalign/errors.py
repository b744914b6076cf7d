"""Exception types of mmalign. Every message says what is wrong and where (``file:line: field: problem``)."""

from __future__ import annotations


class MMAlignError(Exception):
    """Base class of every error mmalign raises on purpose."""


class DataError(MMAlignError, ValueError):
    """Bad input data. ``str(err)`` is ``file:line: field: problem`` (parts omitted when unknown)."""

    def __init__(
        self, problem: str, *, file: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        self.file, self.line, self.field, self.problem = file, line, field, problem
        where = ":".join(str(x) for x in (file, line) if x is not None)
        parts = [p for p in (where, field, problem) if p]
        super().__init__(": ".join(parts))


class TruncationError(DataError):
    """A sample does not fit ``max_length`` and the truncation policy is ``error``."""


class ConfigError(MMAlignError, ValueError):
    """A config file or CLI override is invalid."""


class ModelLoadError(MMAlignError):
    """A model or processor cannot be loaded (bad id/path, unsupported architecture, …)."""
