"""The render process: compiles, test-renders and renders templates for its parent.

Started by ``notify_kit.templating.pool.ProcessPool`` as
``python -m notify_kit.templating.render_process MEMORY_BYTES``. It limits its own
address space, says it is ready, then answers one request at a time until its input
ends (the parent closed it, or died). It keeps the templates it compiled, by (template,
version, language), since versions never change.

Requests and answers (JSON frames, see ``pool``):

* ``{"op": "analyse", "field", "source", "timeout", "max_bytes"}`` →
  ``{"variables": [...]}`` or ``{"problem": text}``;
* ``{"op": "render", "key", "fields", "render", "variables", "timeout", "max_bytes"}`` →
  ``{"rendered": {field: text}}`` or ``{"failed": {"field", "kind", "message"[, "variable"]}}``.

After a MemoryError the process answers, flagged ``"exiting"``, and exits: memory may
be fragmented or a half-built structure kept alive, and a fresh process costs little.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import BinaryIO

from notify_kit.templating import sandbox
from notify_kit.templating.content import Content
from notify_kit.templating.frames import Message, encode, read_frame

_COMPILED_ENTRIES = 512
_PR_SET_PDEATHSIG = 1

# How a field failed, by the sandbox's exception; anything else is "failed".
_KINDS: Mapping[type[BaseException], str] = {
    sandbox.RenderTimeoutError: "timeout",
    sandbox.MissingVariableError: "missing",
    sandbox.OutputTooLargeError: "too_large",
    sandbox.UnsafeOutputError: "unsafe",
    MemoryError: "memory",
}


class _Worker:
    def __init__(self) -> None:
        self._sandbox = sandbox.Sandbox.create()
        self._compiled: OrderedDict[str, sandbox.CompiledContent] = OrderedDict()

    def handle(self, request: Message) -> Message:
        if request["op"] == "analyse":
            return self._analyse(request)
        return self._render(request)

    def _analyse(self, request: Message) -> Message:
        try:
            variables = sandbox.analyse(
                self._sandbox,
                request["field"],
                request["source"],
                timeout=request["timeout"],
                max_bytes=request["max_bytes"],
            )
        except sandbox.TemplateProblem as exc:
            return {"problem": str(exc), "exiting": isinstance(exc.__cause__, MemoryError)}
        return {"variables": sorted(variables)}

    def _render(self, request: Message) -> Message:
        key: str = request["key"]
        content = Content(language="", fields=request["fields"])
        try:
            compiled, rendered = sandbox.compile_and_render(
                self._sandbox,
                content,
                self._compiled.get(key),
                tuple(request["render"]),
                request["variables"],
                deadline=time.monotonic() + request["timeout"],
                max_bytes=request["max_bytes"],
            )
        except sandbox.FieldRenderError as exc:
            cause = exc.cause
            kind = _KINDS.get(type(cause), "failed")
            failed: dict[str, str] = {
                "field": exc.field,
                "kind": kind,
                "message": f"{type(cause).__name__}: {cause}",
            }
            if isinstance(cause, sandbox.MissingVariableError):
                failed["variable"] = cause.variable
            return {"failed": failed, "exiting": kind == "memory"}
        self._compiled[key] = compiled
        self._compiled.move_to_end(key)
        while len(self._compiled) > _COMPILED_ENTRIES:
            self._compiled.popitem(last=False)
        return {"rendered": rendered}


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies, even in a C call."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request took effect
        sys.exit(0)


def _private_stdout() -> BinaryIO:
    """The pipe to the parent, moved off fd 1 so nothing printed can corrupt a frame."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return out


def serve(memory_bytes: int, requests: BinaryIO, answers: BinaryIO) -> None:
    """Answer requests until the input ends or a MemoryError asks for a fresh process."""
    worker = _Worker()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    answers.write(encode({"ready": True}))
    answers.flush()
    while (request := read_frame(requests)) is not None:
        try:
            answer = worker.handle(request)
        except MemoryError:  # outside a template: compiling, or building the answer
            answer = {"failed": {"field": "", "kind": "memory", "message": ""}, "exiting": True}
        answers.write(encode(answer))
        answers.flush()
        if answer.get("exiting"):
            return


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m template_svc.render_process MEMORY_BYTES``."""
    args = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this stops
    answers = _private_stdout()
    serve(int(args[0]), sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
