"""The ``napari-glimpse`` command line: one module per command (train, finetune, predict, merge,
measure, evaluate, quantize), each with ``add_parser(sub)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Sequence

from ..errors import GlimpseError
from . import evaluate, finetune, measure, merge, predict, quantize, train
from ._args import check_model_out, threads
from .evaluate import _classification  # noqa: F401  (tests and benchmarks read it here)
from .finetune import FINETUNE_MINUTES  # noqa: F401

COMMANDS = {"train": train, "finetune": finetune, "predict": predict, "merge": merge, "measure": measure,
            "evaluate": evaluate, "quantize": quantize}


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one error line naming the command's --help (exit 2), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="napari-glimpse",
        description="Cephalometric landmarks with a foveated pyramid glimpse CNN.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


@contextlib.contextmanager
def _warning_lines():
    """Show :class:`GlimpseWarning` (a repaired input, e.g. NaN pixels) as one
    ``napari-glimpse: warning: ...`` line on stderr, beside any progress bar."""
    from ..errors import GlimpseWarning, printable

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GlimpseWarning):
            from tqdm.auto import tqdm

            tqdm.write(printable(f"napari-glimpse: warning: {message}"), file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


@contextlib.contextmanager
def _processes(a: argparse.Namespace):
    """``train`` and ``finetune`` under torchrun: join the process group (gloo, or NCCL with
    ``--device`` this process's GPU), and at the end wait for every rank before leaving it
    (:func:`napari_glimpse.distributed.session`). Anything else, or one process: nothing."""
    if a.command not in ("train", "finetune"):
        yield
        return
    from ..distributed import launched, session

    with session(a.device) as dev:
        if launched():
            a.device = dev
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if getattr(a, "nice", 0):  # before torch is imported (threads() imports it)
            os.nice(a.nice)
        threads(getattr(a, "threads", None))
        if getattr(a, "spacing", None) is not None:
            from ..spacing import check_spacing

            a.spacing = check_spacing(a.spacing, "--spacing")
        if a.command in ("train", "finetune", "quantize"):
            check_model_out(a.out)
        with _warning_lines(), _processes(a):
            return COMMANDS[a.command].run(a)
    except GlimpseError as exc:
        from ..errors import printable

        print(printable(f"napari-glimpse: error: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-glimpse: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied on the output, ...
        print(f"napari-glimpse: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2

