"""A quiet console for the recipes: the progress bar, the recipe's own `repic.*` messages
and the results on the terminal; library chatter (vLLM, Ray, DeepSpeed, transformers,
Python warnings) in the run's log file. `verbose` puts everything on the console too.

Ray actors and the processes they spawn (vLLM's engine core) log in other processes:
`worker_setup_hook` sends their stdout and stderr (file descriptors 1 and 2, so child
processes inherit it) to the same log file; it runs in every Ray worker through the
runtime env's `worker_process_setup_hook`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
CONSOLE_LOGGERS = ("repic",)
"""Loggers (and their children) shown on a quiet console."""


class _ConsoleFilter(logging.Filter):
    """Quiet console: the recipes' own records, and errors from anyone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] in CONSOLE_LOGGERS


def _is_console(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


def route_library_loggers() -> None:
    """Loggers that libraries gave their own console handler (Ray, DeepSpeed, vLLM) lose
    it and propagate to the root logger, whose handlers decide (file, filtered console).
    Run again after importing or starting a library that configures its own logging."""
    for logger in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        if not isinstance(logger, logging.Logger) or logger.name.split(".")[0] in CONSOLE_LOGGERS:
            continue
        consoles = [h for h in logger.handlers if _is_console(h)]
        for handler in consoles:
            logger.removeHandler(handler)
        if consoles:
            logger.propagate = True


def setup_logging(log_file: str | Path | None, verbose: bool = False) -> None:
    """Root logger -> `log_file` (everything, INFO and up) and the console (everything when
    `verbose`, else only `repic.*` and errors); Python warnings become log records."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    if not verbose:
        console.addFilter(_ConsoleFilter())
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file, encoding="utf-8")
        file.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(file)
    logging.captureWarnings(True)
    if not verbose:
        warnings.simplefilter("default")  # each warning once per location, into the log file
        if "transformers" in sys.modules:  # its per-load / per-save bars ("Loading weights")
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    route_library_loggers()


def worker_setup_hook(log_file: str | Path):
    """A `worker_process_setup_hook` that sends a Ray worker's output to `log_file`."""
    path = str(Path(log_file).resolve())

    def repic_worker_output_to_log_file() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    return repic_worker_output_to_log_file
