"""Audit settings as plain values, so the audit package never imports the policy package.

The policy's `audit:` block (`policy.audit`) has the same field names; `AuditConfig.from_settings` copies them,
and a policy reload hands the writer a new `AuditConfig` (`AuditWriter.configure`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """`max_body_bytes`: longest stored body (decoded); longer ones are stored cut, with full size and digest.
    `redact_*`: added to the built-in lists (`bastion.audit.redact`). `on_failure`: "deny" refuses calls
    (503 audit_unavailable) while records cannot even be spooled, "allow" lets them through unaudited.
    `retention_records` / `retention_bodies`: seconds to keep records / bodies; None keeps them forever."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    redact_headers: tuple[str, ...] = ()
    redact_json_keys: tuple[str, ...] = ()
    redact_patterns: tuple[str, ...] = ()
    on_failure: Literal["deny", "allow"] = "deny"
    retention_records: float | None = None
    retention_bodies: float | None = None

    def __post_init__(self) -> None:
        if self.max_body_bytes < 0:
            raise ValueError("audit.max_body_bytes must not be negative")
        if self.on_failure not in ("deny", "allow"):
            raise ValueError(f"audit.on_failure must be deny or allow, not {self.on_failure!r}")
        for name in ("retention_records", "retention_bodies"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"audit.{name} must be a positive number of seconds")
        for pattern in self.redact_patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"audit.redact_patterns: {pattern!r} is not a valid regex: {e}") from None

    @classmethod
    def from_settings(cls, settings: Any) -> AuditConfig:
        """From any object with the same attribute names (the policy's `AuditSettings`)."""
        defaults = cls()
        return cls(
            max_body_bytes=int(getattr(settings, "max_body_bytes", defaults.max_body_bytes)),
            redact_headers=tuple(getattr(settings, "redact_headers", ())),
            redact_json_keys=tuple(getattr(settings, "redact_json_keys", ())),
            redact_patterns=tuple(getattr(settings, "redact_patterns", ())),
            on_failure=getattr(settings, "on_failure", defaults.on_failure),
            retention_records=getattr(settings, "retention_records", None),
            retention_bodies=getattr(settings, "retention_bodies", None),
        )
