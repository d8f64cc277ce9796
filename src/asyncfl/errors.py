"""The asyncfl exception hierarchy.

::

    AsyncFLError                  base of everything asyncfl raises on purpose
    ├── ConfigError               a config (file, --set override) is invalid; lists every problem
    ├── UpdateRejected            a client update failed validation; server state is unchanged
    ├── ProtocolError             a protocol message is out of order, malformed or forged
    │   └── CryptoError           decryption / authentication / signature failure
    ├── PrivacyBudgetExceeded     the next step would spend more privacy than the budget allows
    └── DataError                 a dataset or device file is missing or malformed

Third-party exceptions are converted where they enter the package (``raise ... from exc``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AsyncFLError",
    "ConfigError",
    "ConfigProblem",
    "CryptoError",
    "DataError",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "UpdateRejected",
]


class AsyncFLError(Exception):
    """Base class of every error asyncfl raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One bad config field: where it is, what it holds, and what would be allowed."""

    path: str
    value: object
    expected: str

    def __str__(self) -> str:
        return f"{self.path}: got {self.value!r}; expected {self.expected}"


class ConfigError(AsyncFLError):
    """A config is invalid. ``problems`` lists every bad field, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


class UpdateRejected(AsyncFLError):
    """A client update was refused. ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"update rejected ({reason}): {detail}")


class ProtocolError(AsyncFLError):
    """A protocol message arrived in the wrong stage, malformed, replayed or forged."""


class CryptoError(ProtocolError):
    """Decryption, authentication or signature verification failed."""


class PrivacyBudgetExceeded(AsyncFLError):
    """Taking the next step would spend more privacy than the configured budget."""


class DataError(AsyncFLError):
    """A dataset or device file is missing or malformed."""
