"""How the worker scripts end (imported by them as ``from worker_exit import run_and_exit``)."""

from __future__ import annotations

from collections.abc import Callable

from veofast.utils.helper import exit_process


def run_and_exit(main: Callable[[], None]) -> None:
    """Run ``main()`` and end the process with ``exit_process``: code 0, or 3 after an exception, whose type and text
    are printed as ``ERROR <type>: <text>`` for the test to check."""
    code = 0
    try:
        main()
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        code = 3
    exit_process(code)
