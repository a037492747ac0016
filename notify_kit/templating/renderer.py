"""Compiling and rendering in render processes, with deadlines, an output cap and a
memory limit.

The service's own process never runs a template: it sends the job to a render process
(``notify_kit.templating.pool``) and maps the answer to a ServiceError. So a template that spins
in a C call or grabs memory costs one render process until its deadline, never the event
loop, the health checks or the other requests.

A render that uses up the full time budget is the template's fault: FAILED_PRECONDITION
``RENDER_TIMEOUT``, which a worker does not retry. One that ran out of the shorter time
its caller had left may succeed with more: DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from notify.v1 import common_pb2

from notify_kit import metrics
from notify_kit.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ServiceError
from notify_kit.settings import SettingsError, env_float, env_int
from notify_kit.telemetry import span
from notify_kit.templating.content import SINGLE_LINE_FIELDS, Content
from notify_kit.templating.frames import Message
from notify_kit.templating.messages import CHANNEL_FIELDS
from notify_kit.templating.pool import ProcessPool, ProcessStopped

log = logging.getLogger(__name__)

_CHILD = "notify_kit.templating.render_process"
# The child stops itself at its deadline; this much earlier than the parent gives up, so
# that normally the child answers "timeout" and is kept, instead of being killed.
_CHILD_MARGIN = 0.1


@dataclass(frozen=True, slots=True)
class RenderSettings:
    """The limits of rendering, the same wherever it runs; fails fast on a bad value."""

    # NOTIFY_RENDER_TIMEOUT: seconds one rendering (or one field's test render) may take.
    timeout: float = 2.0
    # NOTIFY_RENDER_MAX_BYTES: cap on what one rendering produces, all fields together.
    max_bytes: int = 256 * 1024
    # NOTIFY_RENDER_PROCESSES: render processes, each rendering one template at a time.
    processes: int = 2
    # NOTIFY_RENDER_MEMORY_MB: address-space limit of each render process (an idle one
    # maps about 55 MB); a template that needs more fails with RENDER_OUT_OF_MEMORY.
    memory_mb: int = 192

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise SettingsError("NOTIFY_RENDER_TIMEOUT must be positive")
        if self.max_bytes <= 0:
            raise SettingsError("NOTIFY_RENDER_MAX_BYTES must be positive")
        if self.processes <= 0:
            raise SettingsError("NOTIFY_RENDER_PROCESSES must be positive")
        if self.memory_mb < 96:
            raise SettingsError("NOTIFY_RENDER_MEMORY_MB must be at least 96")

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, processes: int = 2
    ) -> RenderSettings:
        """Read ``NOTIFY_RENDER_*`` (``processes``: this service's default pool size)."""
        default = cls()
        return cls(
            timeout=env_float("NOTIFY_RENDER_TIMEOUT", default.timeout, env),
            max_bytes=env_int("NOTIFY_RENDER_MAX_BYTES", default.max_bytes, env),
            processes=env_int("NOTIFY_RENDER_PROCESSES", processes, env),
            memory_mb=env_int("NOTIFY_RENDER_MEMORY_MB", default.memory_mb, env),
        )


class Renderer:
    """Test-renders contents when they are saved and renders them on request."""

    def __init__(self, settings: RenderSettings) -> None:
        self._timeout = settings.timeout
        self._max_bytes = max_bytes = settings.max_bytes
        # Rendered text is at most max_bytes; JSON escaping at most sixfold; plus framing.
        self._pool = ProcessPool(
            _CHILD,
            [str(settings.memory_mb << 20)],
            size=settings.processes,
            max_answer=6 * max_bytes + 65536,
        )

    @property
    def timeout(self) -> float:
        """The full time budget of one rendering."""
        return self._timeout

    @property
    def pids(self) -> list[int]:
        """The render processes' ids."""
        return self._pool.pids

    async def start(self) -> None:
        """Start the render processes."""
        await self._pool.start()

    async def close(self) -> None:
        """Stop the render processes (a running render is abandoned)."""
        await self._pool.close()

    async def prepare(self, contents: Sequence[Content], path: str) -> list[Content]:
        """Compile and test-render every field; return the contents with their variables.

        Every problem is reported at once, each with its field path (``path[i].email.subject``).
        """
        violations: list[tuple[str, str]] = []
        prepared: list[Content] = []
        for index, content in enumerate(contents):
            variables: set[str] = set()
            line_variables: set[str] = set()
            for field, source in content.fields.items():
                problem, found = await self._analyse(field, source)
                if problem is not None:
                    violations.append((f"{path}[{index}].{field}", problem))
                variables |= found
                if field in SINGLE_LINE_FIELDS:
                    line_variables |= found
            prepared.append(
                replace(
                    content,
                    variables=frozenset(variables),
                    line_variables=frozenset(line_variables),
                )
            )
        if violations:
            raise InvalidArgument(
                "INVALID_TEMPLATE",
                "the template does not compile or breaks the sandbox",
                field_violations=violations,
            )
        return prepared

    async def _analyse(self, field: str, source: str) -> tuple[str | None, set[str]]:
        """(why the field cannot be saved, or None; the variables it reads)."""
        request = {
            "op": "analyse",
            "field": field,
            "source": source,
            "timeout": _child_timeout(self._timeout),
            "max_bytes": self._max_bytes,
        }
        try:
            answer = await self._pool.call(request, self._timeout)
        except TimeoutError:
            return f"rendering takes longer than {self._timeout:g}s", set()
        except ProcessStopped as exc:
            log.warning("test render of %s stopped its render process: %s", field, exc)
            return "rendering stopped the render process (too much memory?)", set()
        if "problem" in answer:
            return str(answer["problem"]), set()
        return None, set(answer["variables"])

    async def render(
        self,
        tenant: str,
        template_id: str,
        version: int,
        content: Content,
        channel: common_pb2.Channel.ValueType,
        variables: Mapping[str, Any],
        *,
        timeout: float,
    ) -> dict[str, str]:
        """Render ``channel`` of ``content`` (of version ``version`` of the tenant's
        template; the three name the compiled template the render process keeps, so two
        tenants' templates of one id never share one); map every failure to a
        ServiceError."""
        where = {"template_id": template_id, "version": str(version)}
        request = {
            "op": "render",
            "key": f"{tenant}/{template_id}/{version}/{content.language}",
            "fields": dict(content.fields),
            "render": list(CHANNEL_FIELDS[channel]),
            "variables": dict(variables),
            "timeout": _child_timeout(timeout),
            "max_bytes": self._max_bytes,
        }
        started, outcome = time.perf_counter(), "failed"
        try:
            with span("render", template_id=template_id, version=version, tenant=tenant):
                answer = await self._pool.call(request, timeout)
            if "failed" in answer:
                raise self._render_error(answer["failed"], timeout, where)
            outcome = "ok"
        except TimeoutError as exc:
            raise self._timeout_error(timeout, where) from exc
        except ProcessStopped as exc:
            log.warning("render of %s stopped its render process: %s", where, exc)
            raise FailedPrecondition(
                "RENDER_FAILED", "rendering stopped the render process", metadata=where
            ) from exc
        finally:
            label = common_pb2.Channel.Name(channel).removeprefix("CHANNEL_").lower()
            metrics.RENDER_SECONDS.labels(label, outcome).observe(time.perf_counter() - started)
        rendered: dict[str, str] = answer["rendered"]
        return rendered

    def _timeout_error(self, timeout: float, where: Mapping[str, str]) -> ServiceError:
        message = f"rendering took longer than {timeout:g}s"
        if timeout >= self._timeout:
            return FailedPrecondition("RENDER_TIMEOUT", message, metadata=where)
        return DeadlineExceeded("RENDER_TIMEOUT", message, metadata=where)

    def _render_error(
        self, failed: Message, timeout: float, where: Mapping[str, str]
    ) -> ServiceError:
        """The ServiceError for a field that failed to render, by how it failed."""
        field, kind = str(failed["field"]), failed["kind"]
        metadata = {**where, "field": field}
        if kind == "timeout":
            return self._timeout_error(timeout, metadata)
        if kind == "missing":
            variable = str(failed["variable"])
            return FailedPrecondition(
                "MISSING_VARIABLE",
                f"{field}: {failed['message']}",
                metadata={**metadata, "variable": variable},
            )
        if kind == "too_large":
            return FailedPrecondition(
                "OUTPUT_TOO_LARGE",
                f"the rendered output is larger than {self._max_bytes} bytes",
                metadata={**metadata, "max_bytes": str(self._max_bytes)},
            )
        if kind == "unsafe":
            return FailedPrecondition(
                "UNSAFE_OUTPUT", f"{field} rendered with a line break", metadata=metadata
            )
        if kind == "memory":
            return FailedPrecondition(
                "RENDER_OUT_OF_MEMORY",
                f"{field}: rendering needs too much memory",
                metadata=metadata,
            )
        log.info("render of %s failed: %s", metadata, failed["message"])
        return FailedPrecondition(
            "RENDER_FAILED", f"{field}: {failed['message']}", metadata=metadata
        )


def _child_timeout(timeout: float) -> float:
    """The child's own deadline: a little before the parent's, never less than half of it."""
    return max(timeout - _CHILD_MARGIN, timeout / 2)
