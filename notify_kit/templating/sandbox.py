"""Jinja2 in a sandbox: compile, analyse and render template fields, bounded in time and size.

Templates are written by API clients, so they are untrusted code. They run in a
``SandboxedEnvironment`` tightened in three ways:

* reaching for an unsafe attribute fails at once (instead of yielding an undefined value
  that may go unnoticed);
* nothing a template can do in one step builds a huge value: ``*``, ``**``, ``+``, ``%``
  and ``~``, every filter and the growing ``str``/``list`` methods check their arguments
  (or an estimate of their result) against ``_MAX_REPEAT_LENGTH`` *before* they allocate,
  because the output budget is only checked on what reaches the output, and a single
  ``'x'|center(4000000000)`` would take the process down long before that;
* every call, every filter, every loop iteration and every output chunk checks the render
  deadline, so a runaway template stops its own worker thread instead of only being
  abandoned by the caller (a thread spinning after ``asyncio.wait_for`` gave up keeps
  its pool slot forever).

Loops and ``~`` are plain Python in the compiled template, so the parser's tree is
rewritten to route them through methods of the environment (``loop_guard`` and
``guarded_concat``). Filters are wrapped in ``_bounded_filter``, which also keeps Jinja
from evaluating them at compile time, where no check would run.

Everything here is synchronous: it runs in the renderer's worker threads.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import BuiltinMethodType, MethodType
from typing import Any, NoReturn, TypeGuard

import jinja2
from jinja2 import ChainableUndefined, StrictUndefined, Undefined, meta, nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.filters import make_attrgetter
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext, markup_join, str_join
from jinja2.sandbox import SandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import _PassArg, pass_context, pass_eval_context
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, soft_str

from notify_kit import formats
from notify_kit.templating.content import HTML_FIELDS, SINGLE_LINE_FIELDS, Content

log = logging.getLogger(__name__)

# The largest integer a template may compute, in bits: 2 ** 4096 is already far beyond any
# sensible template number, and a product or power of two such numbers is one C call that
# holds the GIL (repeated squaring of 3 ** 2000 ran for seconds per step).
_MAX_INT_BITS = 4096
# The largest string, list or padding one step of a template may build ("ab" * n, [x] * n,
# 'x'|center(n), ...); well above the output budget, far below what hurts the process.
_MAX_REPEAT_LENGTH = 1 << 20
_deadline: ContextVar[float] = ContextVar("render_deadline", default=math.inf)

_SIZED = (str, bytes, list, tuple)
_DIGITS = re.compile(r"\d+")
# One printf-style conversion: %[(key)][flags][width][.precision][length]type.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")
# %f of a float near 1e308 prints about 310 digits whatever the precision.
_FLOAT_DIGITS = 330


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


def _check_size(size: int, what: str) -> None:
    """Refuse a step of the template that would build something larger than the limit."""
    if size > _MAX_REPEAT_LENGTH:
        raise SecurityError(f"the result of {what} would be too large")


class _Sandbox(SandboxedEnvironment):
    """SandboxedEnvironment that fails loudly and bounds arithmetic, calls, loops and time."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        """Refuse at once: ``''.__class__`` must never render as an empty string."""
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed"
        )

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Parse, then send every loop through ``loop_guard`` and every ``~`` through
        ``guarded_concat`` (``parse`` and ``from_string`` both come through here)."""
        tree = super()._parse(source, name, filename)
        _Guards().visit(tree)
        tree.set_environment(self)
        return tree

    def loop_guard(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """What every ``{% for %}`` iterates: ``iterable``, checking the deadline before each item.

        Nested loops over a big list call nothing, so without this the deadline would
        never be looked at again once they started.
        """
        for item in iterable:
            _check_deadline()
            yield item

    @pass_eval_context
    def guarded_concat(self, eval_ctx: EvalContext, *values: Any) -> str:
        """``a ~ b ~ ...``: Jinja's own join, refused first when the result would be too large
        or a part is not data (measured before anything is converted to text)."""
        _check_size(sum(map(printed_size, values)), "~")
        convert = soft_str if eval_ctx.autoescape else str
        parts = [convert(value) for value in values]
        return markup_join(parts) if eval_ctx.autoescape else str_join(parts)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Refuse ``*``, ``**``, ``+`` and ``%`` whose result would be too big to compute safely."""
        if (
            operator == "**"
            and _int(left)
            and _int(right)
            and right > 0
            and left.bit_length() * right > _MAX_INT_BITS
        ):
            raise SecurityError("the result of ** is too large")
        if (
            operator == "*"
            and _int(left)
            and _int(right)
            and left.bit_length() + right.bit_length() > _MAX_INT_BITS
        ):
            raise SecurityError("the result of * is too large")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, _SIZED) and _int(times):
                    _check_size(len(seq) * times, "*")
        if operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
            _check_size(len(left) + len(right), "+")
        if operator == "%" and isinstance(left, str | bytes):
            _check_size(_percent_size(left, right), "%")
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Check the deadline before every call, and the size of what growing methods build.

        A recursive loop's ``loop(children)`` iterates ``children`` directly, so it gets
        the loop guard here.
        """
        _check_deadline()
        if isinstance(obj, LoopContext) and args:
            args = (self.loop_guard(args[0]), *args[1:])
        owner = getattr(obj, "__self__", None)
        method = getattr(obj, "__name__", "")
        if isinstance(owner, str | bytes) and method in _METHOD_SIZES:
            if method == "join" and len(args) == 1:
                args = (list(args[0]),)  # measured here, then joined
            _check_size(_METHOD_SIZES[method](owner, *args, **kwargs), f"{method}()")
        elif isinstance(owner, list) and method == "extend" and len(args) == 1:
            # Materialized first: a.extend(a|batch(1)) would otherwise grow a forever
            # inside one C call, out of reach of any check.
            args = (list(args[0]),)
            _check_size(len(owner) + len(args[0]), "extend()")
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format``/``format_map`` with Jinja's sandboxed field lookup, bounded in size.

        Same shape as Jinja's own wrapper, with a formatter that refuses huge widths and
        precisions and stops once the fields add up to too much.
        """
        if not isinstance(value, MethodType | BuiltinMethodType) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        template = value.__self__
        if not isinstance(template, str):
            return None
        kind = type(template)

        def formatter() -> _BoundedFormatter:
            if isinstance(template, Markup):
                return _BoundedEscapeFormatter(self, escape=template.escape)
            return _BoundedFormatter(self)

        if value.__name__ == "format_map":

            def format_map(mapping: Mapping[str, Any], /) -> str:
                return kind(formatter().vformat(template, (), mapping))

            return functools.update_wrapper(format_map, value)

        def format_(*args: Any, **kwargs: Any) -> str:
            return kind(formatter().vformat(template, args, kwargs))

        return functools.update_wrapper(format_, value)


class _Guards(NodeTransformer):
    """Rewrites ``{% for x in it %}`` to iterate ``loop_guard(it)`` and ``a ~ b`` to a call."""

    def visit_For(self, node: nodes.For) -> nodes.Node:  # noqa: N802 (Jinja's visitor naming)
        self.generic_visit(node)
        node.iter = _environment_call("loop_guard", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802 (Jinja's visitor naming)
        self.generic_visit(node)
        return _environment_call("guarded_concat", node.nodes, node.lineno)


def _environment_call(method: str, args: Sequence[nodes.Node], lineno: int) -> nodes.Call:
    """A call of a method of the environment: templates cannot name it, nor shadow it."""
    function = nodes.EnvironmentAttribute(method, lineno=lineno)
    return nodes.Call(function, list(args), [], None, None, lineno=lineno)


class _BoundedFormatter(SandboxedFormatter):
    """Refuses a width or precision over the limit, and fields adding up to more than it.

    One instance formats one string: it counts what the fields printed so far.
    """

    def __init__(self, env: jinja2.Environment, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._printed = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        """``{0!r}`` and ``{0!s}`` print the value: it must be printable data."""
        if conversion is not None:
            printed_size(value)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        """Check the value and the (resolved) spec before formatting, the total after."""
        printed_size(value)
        _check_size(max(map(_spec_number, _DIGITS.findall(format_spec)), default=0), "format()")
        text = super().format_field(value, format_spec)
        self._printed += len(text)
        _check_size(self._printed, "format()")
        return text


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    """The bounded formatter for ``Markup.format``, which escapes the fields."""


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _spec_number(digits: str) -> int:
    """A width or precision written in a format spec; 9 digits or more are too many anyway."""
    return int(digits) if len(digits) <= 8 else _MAX_REPEAT_LENGTH + 1


# What a template may print: data, as it came from the caller's variables or was built
# from them. Anything else (a function, a bound method, a generator, a macro, the loop)
# prints as its repr, which may carry a memory address of the process.
_PRINTABLE_CONTAINERS = (list, tuple, dict, set, frozenset)
_REPR_ESCAPE = 10  # the longest escape repr() writes for one character: \U0001xxxx


def printed_size(value: Any) -> int:
    """An upper bound on ``len(str(value))``, found without printing it.

    Raises SecurityError when ``value`` (or anything inside it) is not data, or when the
    text would be larger than one step may build: ``["x" * 2**20] * 300`` is a small list
    of one shared string whose text is 300 MB, so the size must be known before ``str``.
    Shared and cyclic references are counted every time they are met (repr prints them
    again), so the walk ends at the latest when the bound passes the limit.
    """
    if type(value) is str:
        return len(value)  # the common case: a variable printed as it is
    total, pending, steps = 0, [(value, False)], 0
    while pending:
        item, nested = pending.pop()
        if isinstance(item, str | bytes):
            size = len(item)
            if nested:  # inside a container a string prints as its repr: quotes, escapes
                size = size * _REPR_ESCAPE + 3
                if total + size > _MAX_REPEAT_LENGTH:
                    size = len(repr(item))  # the bound is too coarse here: measure
            total += size
        elif item is None or isinstance(item, bool | Undefined):
            total += 5
        elif _int(item):
            total += item.bit_length() // 3 + 2  # digits <= bits * log10(2) + 1, a sign
        elif isinstance(item, float):
            total += 24
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            pending.extend((part, True) for pair in item.items() for part in pair)
        elif isinstance(item, _PRINTABLE_CONTAINERS):
            total += 2 + 2 * len(item)
            pending.extend((part, True) for part in item)
        else:
            raise SecurityError(f"a {type(item).__name__} cannot be printed")
        _check_size(total, "printing a value")
        steps += 1
        if steps % 4096 == 0:
            _check_deadline()
    return total


def _percent_size(template: str | bytes, values: Any) -> int:
    """Upper bound on ``len(template % values)``: every conversion prints the longest value,
    padded to its width or precision (a ``*`` takes the largest integer given)."""
    if isinstance(template, bytes):
        template = template.decode("latin-1")
    if isinstance(values, Mapping):
        given = list(values.values())
    else:
        given = list(values) if isinstance(values, tuple) else [values]
    longest = max(
        (_FLOAT_DIGITS if isinstance(v, float) else printed_size(v) for v in given), default=0
    )
    star = max((v for v in given if _int(v)), default=0)
    size = len(template)
    for width, precision in _PERCENT_SPEC.findall(template):
        padding = [star if n == "*" else _spec_number(n) for n in (width, precision) if n]
        size += longest + max(padding, default=0)
    return size


def _padded_size(text: Any, width: Any = 0, *_: Any) -> int:
    """center/ljust/rjust/zfill: the text padded to ``width``."""
    return max(len(text), width) if _int(width) else len(text)


def _expandtabs_size(text: Any, tabsize: Any = 8) -> int:
    """Every tab becomes up to ``tabsize`` spaces."""
    if not _int(tabsize):
        return len(text)
    tabs: int = text.count("\t" if isinstance(text, str) else b"\t")
    return len(text) + tabs * max(tabsize, 0)


def _replace_size(text: Any, old: Any, new: Any, count: Any = -1) -> int:
    """Every match (at most ``count``; ``''`` matches between all characters) grows the text."""
    matches: int = text.count(old)
    if _int(count) and count >= 0:
        matches = min(matches, count)
    return len(text) + matches * max(len(new) - len(old), 0)


def _join_size(separator: Any, items: list[Any]) -> int:
    """The items printed, with a separator between each two."""
    return len(separator) * max(len(items) - 1, 0) + sum(map(printed_size, items))


def _translate_size(text: Any, table: Any, *_: Any, **__: Any) -> int:
    """A str translation table may map one character to a long string."""
    if not isinstance(text, str):
        return len(text)  # bytes.translate maps byte to byte
    if isinstance(table, Mapping):
        replacements: Iterable[Any] = table.values()
    else:
        replacements = table if isinstance(table, list | tuple) else ()
    longest = max((len(r) for r in replacements if isinstance(r, str)), default=1)
    return len(text) * max(longest, 1)


# Methods of str (and bytes) whose result can be much larger than the string and the
# arguments together; each estimate takes the string, then the call's arguments.
# (format and format_map are bounded by wrap_str_format.)
_METHOD_SIZES: Mapping[str, Callable[..., int]] = {
    "center": _padded_size,
    "ljust": _padded_size,
    "rjust": _padded_size,
    "zfill": _padded_size,
    "expandtabs": _expandtabs_size,
    "replace": _replace_size,
    "join": _join_size,
    "translate": _translate_size,
}

Arguments = MutableMapping[str, Any]


def _items(arguments: Arguments, name: str, environment: jinja2.Environment) -> list[Any]:
    """The filter's iterable as a list (put back, so the filter consumes the same items),
    or the ``attribute`` of each item when the filter was given one."""
    items = arguments[name] = list(arguments[name])
    attribute = arguments["attribute"]
    if attribute is None:
        return items
    return list(map(make_attrgetter(environment, attribute), items))


def _format_filter_size(arguments: Arguments) -> int:
    return _percent_size(str(arguments["value"]), arguments["kwargs"] or arguments["args"])


def _indent_filter_size(arguments: Arguments) -> int:
    text, width = str(arguments["s"]), arguments["width"]
    step = len(width) if isinstance(width, str) else width if _int(width) else 0
    return len(text) + (text.count("\n") + 1) * max(step, 0)


def _join_filter_size(arguments: Arguments) -> int:
    items = _items(arguments, "value", arguments["eval_ctx"].environment)
    return _join_size(str(arguments["d"]), items)


def _replace_filter_size(arguments: Arguments) -> int:
    text, old, new = (str(arguments[name]) for name in ("s", "old", "new"))
    return _replace_size(text, old, new, arguments["count"])


def _sum_filter_size(arguments: Arguments) -> int:
    """Only a list or tuple ``start`` builds something new: the concatenation of all items."""
    start = arguments["start"]
    if not isinstance(start, list | tuple):
        return 0
    items = _items(arguments, "iterable", arguments["environment"])
    return len(start) + sum(len(item) for item in items if isinstance(item, list | tuple))


def _tojson_filter_size(arguments: Arguments) -> int:
    """The JSON with one-space indents, each indent widened to the requested one."""
    indent = arguments["indent"]
    step = len(indent) if isinstance(indent, str) else indent if _int(indent) else 0
    if step <= 1:
        return 0  # no larger than the value itself
    text = json.dumps(arguments["value"], indent=1)
    indents = sum(len(line) - len(line.lstrip(" ")) for line in text.splitlines())
    return len(text) + indents * (step - 1)


def _wordwrap_filter_size(arguments: Arguments) -> int:
    """At most one line per character, each followed by the wrap string."""
    text, wrap = str(arguments["s"]), arguments["wrapstring"]
    if wrap is None:
        wrap = arguments["environment"].newline_sequence
    return len(text) + (len(text) + 1) * len(str(wrap))


# Filters whose result can be much larger than their arguments; each estimate takes the
# filter's bound arguments (by parameter name, defaults applied) and may replace the
# iterable by a list, which the filter then receives.
_FILTER_SIZES: Mapping[str, Callable[[Arguments], int]] = {
    "format": _format_filter_size,
    "indent": _indent_filter_size,
    "join": _join_filter_size,
    "replace": _replace_filter_size,
    "sum": _sum_filter_size,
    "tojson": _tojson_filter_size,
    "wordwrap": _wordwrap_filter_size,
}
# Filters whose extra arguments are data (a default value, a value to format, a test's
# argument), not sizes: a large number there builds nothing.
_DATA_FILTERS = frozenset(
    {"d", "default", "float", "format", "int", "map", "reject", "rejectattr", "select"}
    | {"selectattr", "sum"}
)
# Filters that print their value (or, for join, its items): the value must be data and
# its text not too large, measured before the filter converts it.
_TEXT_FILTERS = frozenset(
    {"capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower"}
    | {"pprint", "replace", "safe", "string", "striptags", "title", "tojson", "trim"}
    | {"truncate", "upper", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr"}
)
# What a filter gets before its value, by its Jinja marker.
_LEADING: Mapping[_PassArg | None, Callable[[Context], tuple[Any, ...]]] = {
    None: lambda context: (),
    _PassArg.context: lambda context: (context,),
    _PassArg.eval_context: lambda context: (context.eval_ctx,),
    _PassArg.environment: lambda context: (context.environment,),
}


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` behind the deadline and the size checks.

    Any integer argument above the limit is refused (a width, a count, a precision),
    except for the filters in ``_DATA_FILTERS``; filters in ``_FILTER_SIZES`` also have
    their result estimated. The wrapper always takes the context and hands ``func``
    what its own marker asks for: Jinja never evaluates a context filter at compile
    time, where neither the deadline nor (for Output nodes) the output budget applies.
    """
    leading = _LEADING[_PassArg.from_obj(func)]
    estimate = _FILTER_SIZES.get(name)
    signature = inspect.signature(func)
    check_ints = name not in _DATA_FILTERS
    prints = name in _TEXT_FILTERS
    what = f"the {name} filter"

    @pass_context
    @functools.wraps(func)
    def bounded(context: Context, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        if prints and args:
            printed_size(args[0])
        if check_ints:
            for argument in (*args[1:], *kwargs.values()):  # args[0] is the filtered value
                if _int(argument):
                    _check_size(argument, what)
        call_args = (*leading(context), *args)
        if estimate is not None:
            bound = signature.bind(*call_args, **kwargs)
            bound.apply_defaults()
            _check_size(estimate(bound.arguments), what)
            call_args, kwargs = bound.args, bound.kwargs
        return func(*call_args, **kwargs)

    return bounded


def _finalize(value: Any) -> Any:
    """What ``{{ ... }}`` prints: an explicit null as nothing (not "None"), data only.

    Every output goes through here before it is converted to text, so this is where a
    function's repr (``{{ 'a'.format_map }}`` printed a memory address) and a value whose
    text would be huge are refused.
    """
    if value is None:
        return ""
    printed_size(value)
    return value


def _environment(*, autoescape: bool) -> _Sandbox:
    env = _Sandbox(
        undefined=_NamingUndefined,
        autoescape=autoescape,
        finalize=_finalize,
        keep_trailing_newline=True,
    )
    # lipsum(n=10**6) builds megabytes inside one call.
    del env.globals["lipsum"]
    env.filters.update({name: _bounded_filter(name, f) for name, f in env.filters.items()})
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
    except MemoryError as exc:
        raise TemplateProblem("rendering needs too much memory") from exc
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
    return formats.breaks_header(text)
