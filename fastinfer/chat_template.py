"""Chat templates, rendered as HF transformers renders them (a Jinja sandbox), within bounds.

A template comes from the model file, so it is untrusted code: the sandbox keeps it away from
Python's internals, and the bounds below keep it from hanging the process or filling memory
(`range(99999)` nested in itself, a string doubled in a loop, `'x' * 10**10`). A template
that crosses one is a ValueError, as is any other failure while rendering.
"""
import re
import sys
import time

TIME_LIMIT = 2.0          # seconds of rendering
MAX_SIZE = 1 << 20        # characters (or items) of the output and of any value an operator makes
MAX_RANGE = 1 << 16       # elements of one range()
_BIG_NUMBER = 1 << 16     # widths and counts a filter may be given
_WIDTH = re.compile(r"[%{:][-+#0 <>^=]*\d{6,}")  # a %-format or format() width of a million or more


class _Exceeded(BaseException):
    """Raised inside the template to stop it; a BaseException so that no `except Exception` in
    Jinja's runtime swallows it."""


def _checked(value):
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > MAX_SIZE:
        raise _Exceeded(f"a value of {len(value)} items (at most {MAX_SIZE})")
    return value


def _environment():
    # imported here: jinja2 costs ~5 MB of RSS, and only chat needs it
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64 and not isinstance(left, float):
                raise _Exceeded(f"a power of {right}")
            if operator == "*" and any(isinstance(x, (str, bytes, list, tuple)) for x in (left, right)):
                count = right if isinstance(right, int) else left
                other = left if count is right else right
                if isinstance(count, int) and len(other) * max(count, 0) > MAX_SIZE:
                    raise _Exceeded(f"a value of {len(other) * count} items (at most {MAX_SIZE})")
            return _checked(super().call_binop(context, operator, left, right))

    def raise_exception(msg):
        raise TemplateError(msg)

    def bounded_range(*args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise _Exceeded(f"range of {len(r)} (at most {MAX_RANGE})")
        return r

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, range=bounded_range)
    for name in ("center", "indent", "wordwrap", "truncate", "format", "join", "batch", "slice"):
        env.filters[name] = _guard(env.filters[name])
    return env


def _guard(f):
    """A filter whose numeric arguments and format widths are bounded, and whose result is."""
    def guarded(*args, **kwargs):
        for a in (*args[1:], *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _BIG_NUMBER:
                raise _Exceeded(f"a filter argument of {a}")
        if args and isinstance(args[0], str) and _WIDTH.search(args[0]):
            raise _Exceeded("a format width of a million or more")
        return _checked(f(*args, **kwargs))
    if hasattr(f, "jinja_pass_arg"):  # context/environment-passing filters keep their marker
        guarded.jinja_pass_arg = f.jinja_pass_arg
    return guarded


def render(template: str, **context) -> str:
    """The template rendered with context, or a ValueError saying why it could not be."""
    deadline = time.monotonic() + TIME_LIMIT
    steps = 0

    def trace(frame, event, arg):  # every line the template's code runs, in this thread only
        nonlocal steps
        steps += 1
        if not steps & 1023 and time.monotonic() > deadline:
            raise _Exceeded(f"rendering took over {TIME_LIMIT:g} s")
        return trace

    env = _environment()
    out, size = [], 0
    previous = sys.gettrace()
    try:
        compiled = env.from_string(template)
        sys.settrace(trace)
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > MAX_SIZE:
                raise _Exceeded(f"output over {MAX_SIZE} characters")
            out.append(piece)
    except _Exceeded as e:
        raise ValueError(f"chat template stopped: {e}") from None
    except RecursionError:
        raise ValueError("chat template failed: it recurses without end") from None
    except Exception as e:  # a template is data from the model file: any failure is the file's
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"chat template failed: {first}") from None
    finally:
        sys.settrace(previous)
    return "".join(out)
