"""Jinja2 in a sandbox: compile, analyse and render template fields, bounded in time and size.

Templates are written by API clients, so they are untrusted code. They run in a
``SandboxedEnvironment`` tightened three ways: reaching for an unsafe attribute fails at
once (instead of yielding an undefined value that may go unnoticed), ``*`` and ``**``
cannot build huge strings or numbers (``10 ** 10 ** 10`` would freeze the whole process
inside one C call, even at compile time through constant folding), and every call and
every output chunk checks the render deadline and the output budget, so a runaway
template stops its own worker thread instead of only being abandoned by the caller.

Everything here is synchronous: it runs in the renderer's worker threads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn

import jinja2
from jinja2 import ChainableUndefined, StrictUndefined, Undefined, meta
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from template_svc.model import HTML_FIELDS, SINGLE_LINE_FIELDS, Content

log = logging.getLogger(__name__)

_MAX_POWER_BITS = 4096  # 2 ** 4096 is already far beyond any sensible template number
_MAX_REPEAT_LENGTH = 1 << 20  # "ab" * n and [x] * n
_deadline: ContextVar[float] = ContextVar("render_deadline", default=math.inf)


class MissingVariableError(UndefinedError):
    """The template used a variable (or attribute, or item) the caller did not provide."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(message)
        self.variable = variable


class RenderTimeoutError(Exception):
    """The render deadline passed."""


class OutputTooLargeError(Exception):
    """The output went over the byte budget."""


class UnsafeOutputError(Exception):
    """A single-line field rendered with a line break (header injection)."""


class TemplateProblem(Exception):
    """Why a template cannot be saved; the text is shown to the template's author."""


class FieldRenderError(Exception):
    """Rendering ``field`` failed; ``cause`` says how (it decides the error reason)."""

    def __init__(self, field: str, cause: BaseException) -> None:
        super().__init__(f"{field}: {type(cause).__name__}: {cause}")
        self.field = field
        self.cause = cause


class _NamingUndefined(StrictUndefined):
    """A StrictUndefined whose error carries the missing name, for the error's metadata."""

    __slots__ = ()

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> NoReturn:
        if not issubclass(self._undefined_exception, UndefinedError):
            raise self._undefined_exception(self._undefined_message)  # e.g. SecurityError
        name = self._undefined_name
        raise MissingVariableError(
            self._undefined_message if name is None else str(name), self._undefined_message
        )


# StrictUndefined binds its operators to the base class's function object itself, so
# overriding the method is not enough: point every one of them at the override.
for _attr, _value in [*vars(Undefined).items(), *vars(StrictUndefined).items()]:
    if _value is Undefined._fail_with_undefined_error and _attr != "_fail_with_undefined_error":
        setattr(_NamingUndefined, _attr, _NamingUndefined._fail_with_undefined_error)


class _Probe(ChainableUndefined):
    """Stands in for every variable in the test render: prints as a word, chains, iterates empty.

    Printing a word (not "") keeps literal line breaks around a variable visible to the
    one-line check after stripping.
    """

    __slots__ = ()

    def __str__(self) -> str:
        return "probe"


def _check_deadline() -> None:
    if time.monotonic() > _deadline.get():
        raise RenderTimeoutError


class _Sandbox(SandboxedEnvironment):
    """SandboxedEnvironment that fails loudly and bounds arithmetic, calls and time."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        """Refuse at once: ``''.__class__`` must never render as an empty string."""
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed"
        )

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Refuse ``*``/``**`` whose result would be too big to compute safely."""
        if (
            operator == "**"
            and _int(left)
            and _int(right)
            and right > 0
            and left.bit_length() * right > _MAX_POWER_BITS
        ):
            raise SecurityError("the result of ** is too large")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and _int(times)
                    and len(seq) * times > _MAX_REPEAT_LENGTH
                ):
                    raise SecurityError("the result of * is too large")
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Check the deadline before every call, so nested ``range`` loops cannot run on."""
        _check_deadline()
        return super().call(context, obj, *args, **kwargs)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finalize(value: Any) -> Any:
    """An explicit null prints as nothing, not "None"."""
    return "" if value is None else value


def _environment(*, autoescape: bool) -> _Sandbox:
    env = _Sandbox(
        undefined=_NamingUndefined,
        autoescape=autoescape,
        finalize=_finalize,
        keep_trailing_newline=True,
    )
    # lipsum(n=10**6) builds megabytes inside one call.
    del env.globals["lipsum"]
    return env


@dataclass(frozen=True, slots=True)
class Sandbox:
    """The two environments: HTML bodies autoescape, everything else is plain text."""

    text: jinja2.Environment
    html: jinja2.Environment

    @classmethod
    def create(cls) -> Sandbox:
        """Build both environments (once per process; they are thread-safe to render with)."""
        return cls(text=_environment(autoescape=False), html=_environment(autoescape=True))

    def env_for(self, field: str) -> jinja2.Environment:
        """The environment ``field`` is compiled in."""
        return self.html if field in HTML_FIELDS else self.text


CompiledContent = Mapping[str, jinja2.Template]


def analyse(
    sandbox: Sandbox, field: str, source: str, *, timeout: float, max_bytes: int
) -> frozenset[str]:
    """Compile and test-render one field at save time; return the variables it reads.

    The test render gives every variable a permissive stand-in (a word when printed, empty
    when iterated, itself when chained), so it exercises the template's own code: syntax,
    sandbox violations, runaway loops and a line break in a one-line field are caught,
    while failures that depend on real values (arithmetic on a variable) are left for
    render time.
    """
    env = sandbox.env_for(field)
    try:
        tree = env.parse(source)
        variables = frozenset(meta.find_undeclared_variables(tree)) - env.globals.keys()
        template = env.from_string(tree)
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"line {exc.lineno}: {exc.message}") from exc
    except RecursionError as exc:
        raise TemplateProblem("the template is nested too deeply") from exc
    probes = {name: _Probe(name=name) for name in variables}
    try:
        output = _render(template, probes, deadline=time.monotonic() + timeout, budget=max_bytes)
    except SecurityError as exc:
        raise TemplateProblem(f"not allowed in the sandbox: {exc}") from exc
    except RenderTimeoutError as exc:
        raise TemplateProblem(f"rendering takes longer than {timeout:g}s") from exc
    except OutputTooLargeError as exc:
        raise TemplateProblem(f"the output is larger than {max_bytes} bytes") from exc
    except UndefinedError:
        return variables  # depends on the values given at render time
    except TemplateError as exc:
        raise TemplateProblem(str(exc)) from exc
    except Exception as exc:  # template code can raise anything; values decide at render time
        log.debug("test render of %s failed: %r", field, exc)
        return variables
    if field in SINGLE_LINE_FIELDS and _has_line_break(output.strip()):
        raise TemplateProblem("must render to a single line")
    return variables


def compile_and_render(
    sandbox: Sandbox,
    content: Content,
    compiled: CompiledContent | None,
    fields: tuple[str, ...],
    variables: Mapping[str, Any],
    *,
    deadline: float,
    max_bytes: int,
) -> tuple[CompiledContent, dict[str, str]]:
    """Render ``fields`` of ``content`` (compiling it first unless ``compiled`` is given).

    The byte budget covers every field together: it caps what one rendering produces.
    Returns the compiled content (for the cache) and the rendered fields.
    """
    if compiled is None:
        compiled = {name: _compile(sandbox, name, src) for name, src in content.fields.items()}
    rendered: dict[str, str] = {}
    budget = max_bytes
    for name in fields:
        template = compiled.get(name)
        if template is None:
            continue
        try:
            text = _render(template, variables, deadline=deadline, budget=budget)
        except Exception as exc:  # template code can raise anything; the caller maps it
            raise FieldRenderError(name, exc) from exc
        budget -= len(text.encode())
        if name in SINGLE_LINE_FIELDS:
            text = text.strip()
            if _has_line_break(text):
                raise FieldRenderError(name, UnsafeOutputError("line break in a one-line field"))
        rendered[name] = text
    return compiled, rendered


def _compile(sandbox: Sandbox, field: str, source: str) -> jinja2.Template:
    try:
        return sandbox.env_for(field).from_string(source)
    except Exception as exc:  # it compiled when saved; a failure now is a render failure
        raise FieldRenderError(field, exc) from exc


def _render(
    template: jinja2.Template, variables: Mapping[str, Any], *, deadline: float, budget: int
) -> str:
    """Render chunk by chunk, stopping as soon as the deadline or the budget is passed."""
    token = _deadline.set(deadline)
    try:
        _check_deadline()
        parts: list[str] = []
        used = 0
        for chunk in template.generate(dict(variables)):
            used += len(chunk.encode())
            if used > budget:
                raise OutputTooLargeError
            _check_deadline()
            parts.append(chunk)
        return "".join(parts)
    finally:
        _deadline.reset(token)


def _has_line_break(text: str) -> bool:
    return "\r" in text or "\n" in text
