"""The long tier's entry point for a fuzz target: instrument the named modules, hand `check` to
atheris (imported only here: the fast tier replays the corpora without it)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator


def _functions(module: types.ModuleType) -> Iterator[types.FunctionType]:
    """Functions defined in `module`, methods and properties of its classes included."""
    for obj in vars(module).values():
        members = vars(obj).values() if isinstance(obj, type) and obj.__module__ == module.__name__ else ()
        for f in (obj, *members):
            f = getattr(f, "__func__", None) or getattr(f, "fget", None) or f
            if isinstance(f, types.FunctionType) and f.__module__ == module.__name__:
                yield f


def fuzz(check: Callable[[bytes], None], modules: list[types.ModuleType]) -> None:
    """Run `check` under libFuzzer (arguments from sys.argv); coverage is taken from `modules`."""
    import atheris

    for module in modules:
        for f in _functions(module):
            atheris.instrument_func(f)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
