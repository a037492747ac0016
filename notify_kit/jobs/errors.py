"""How a delivery attempt failed, as the job runner and the failover chain need to know it.

Providers raise these at their boundary (one classification table per provider); the
runner decides from the class alone what happens to the job, and the provider chain
decides from it whether the next provider may try the same attempt.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Retrying cannot help: bad address, a 5xx for this recipient, unregistered token.

    Not a provider failure: it neither counts against a circuit breaker nor moves the
    attempt to another provider.
    """


class TransientError(Exception):
    """May succeed later: timeouts, SMTP 4xx, HTTP 5xx/429, a refused session.

    Counts against the provider's circuit breaker, and the same attempt may go to the
    next provider. ``retry_after`` (seconds) is the provider's own hint (HTTP
    ``Retry-After``), honoured by the retry delay and the breaker.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OutcomeUnknown(TransientError):
    """The provider may or may not have accepted the message (a timeout after SMTP DATA).

    Failing over or retrying could deliver it twice, so the runner does so only where
    the provider is idempotent on our notification id; elsewhere it ends FAILED with
    this reason (a dead letter an operator can replay after checking).
    """


class Blocked(Exception):
    """Our side cannot take the job now: every provider's breaker is open, or one of our
    own dependencies (TemplateService, UserService, the ledger database, the broker) is
    down. Never spends an attempt: the runner pauses consumption and retries the same
    job after ``retry_after`` seconds.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
