"""Compiling and rendering off the event loop, with deadlines, an output cap and a cache.

Jinja runs in a small pool of threads owned by the renderer (not the loop's default
executor, which also resolves host names) so a slow template cannot starve anything
else. Each job carries an absolute deadline that the sandbox checks as it goes, and the
caller stops waiting at the same moment with ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from notify.v1 import common_pb2

from notify_kit.cache import LruCache
from notify_kit.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ServiceError
from template_svc import sandbox
from template_svc.model import CHANNEL_FIELDS, Content, Version

log = logging.getLogger(__name__)

T = TypeVar("T")

_THREADS = 4  # rendering is CPU-bound under the GIL; more threads would not add throughput


class Renderer:
    """Test-renders contents when they are saved and renders them on request."""

    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        compiled: LruCache[tuple[str, int, str], sandbox.CompiledContent],
    ) -> None:
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._compiled = compiled
        self._sandbox = sandbox.Sandbox.create()
        self._executor = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="render")

    def close(self) -> None:
        """Drop queued jobs; a running one stops by itself at its deadline."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, contents: Sequence[Content], path: str) -> list[Content]:
        """Compile and test-render every field; return the contents with their variables.

        Every problem is reported at once, each with its field path (``path[i].email.subject``).
        """
        violations: list[tuple[str, str]] = []
        prepared: list[Content] = []
        for index, content in enumerate(contents):
            variables: set[str] = set()
            for field, source in content.fields.items():
                field_path = f"{path}[{index}].{field}"
                job = functools.partial(
                    sandbox.analyse,
                    self._sandbox,
                    field,
                    source,
                    timeout=self._timeout,
                    max_bytes=self._max_bytes,
                )
                try:
                    variables |= await self._run(job, self._timeout)
                except sandbox.TemplateProblem as exc:
                    violations.append((field_path, str(exc)))
                except TimeoutError:
                    violations.append(
                        (field_path, f"rendering takes longer than {self._timeout:g}s")
                    )
            prepared.append(replace(content, variables=frozenset(variables)))
        if violations:
            raise InvalidArgument(
                "INVALID_TEMPLATE",
                "the template does not compile or breaks the sandbox",
                field_violations=violations,
            )
        return prepared

    async def render(
        self,
        version: Version,
        content: Content,
        channel: common_pb2.Channel.ValueType,
        variables: Mapping[str, Any],
        *,
        timeout: float,
    ) -> dict[str, str]:
        """Render ``channel`` of ``content``; map every failure to a ServiceError."""
        key = (version.template_id, version.number, content.language)
        job = functools.partial(
            sandbox.compile_and_render,
            self._sandbox,
            content,
            self._compiled.get(key),
            CHANNEL_FIELDS[channel],
            variables,
            deadline=time.monotonic() + timeout,
            max_bytes=self._max_bytes,
        )
        where = {"template_id": version.template_id, "version": str(version.number)}
        try:
            compiled, rendered = await self._run(job, timeout)
        except TimeoutError as exc:
            raise _timeout(timeout, where) from exc
        except sandbox.FieldRenderError as exc:
            raise _render_error(exc, self._max_bytes, timeout, where) from exc
        self._compiled.put(key, compiled)
        return rendered

    async def _run(self, job: Callable[[], T], timeout: float) -> T:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._executor, job), timeout)


def _timeout(timeout: float, where: Mapping[str, str]) -> DeadlineExceeded:
    return DeadlineExceeded(
        "RENDER_TIMEOUT", f"rendering took longer than {timeout:g}s", metadata=where
    )


def _render_error(
    exc: sandbox.FieldRenderError, max_bytes: int, timeout: float, where: Mapping[str, str]
) -> ServiceError:
    """The ServiceError for a field that failed to render."""
    cause = exc.cause
    metadata = {**where, "field": exc.field}
    if isinstance(cause, sandbox.RenderTimeoutError):
        return _timeout(timeout, metadata)
    if isinstance(cause, sandbox.MissingVariableError):
        return FailedPrecondition(
            "MISSING_VARIABLE",
            f"{exc.field}: {cause}",
            metadata={**metadata, "variable": cause.variable},
        )
    if isinstance(cause, sandbox.OutputTooLargeError):
        return FailedPrecondition(
            "OUTPUT_TOO_LARGE",
            f"the rendered output is larger than {max_bytes} bytes",
            metadata={**metadata, "max_bytes": str(max_bytes)},
        )
    if isinstance(cause, sandbox.UnsafeOutputError):
        return FailedPrecondition(
            "UNSAFE_OUTPUT", f"{exc.field} rendered with a line break", metadata=metadata
        )
    log.info("render failed: %s", exc)
    return FailedPrecondition("RENDER_FAILED", str(exc), metadata=metadata)
