"""The ``repcompiler`` command line (also ``python -m repcompiler``).

Subcommands: ``demo``, ``transform``, ``deploy``, ``fold``, ``export``, ``inspect``,
``quant-report``, ``bench``. Run ``repcompiler COMMAND --help`` for each one's options.

Models are named as ``torchvision:resnet50``, ``timm:repvgg_a0`` (timm installed;
never pretrained) or ``package.module:factory``, or given as a file holding a whole
pickled model (only with ``--trust-pickle``: unpickling runs code from the file).
``--weights FILE`` loads a state dict safely (``weights_only=True``); ``transform
--weights`` then starts every block as the pretrained conv it replaces
(``orepa_transform(init="from_conv")``), so the weights are kept. Every output is
written atomically. Errors print one line, ``repcompiler: error: ...``, on stderr;
bad usage (an unknown option, a malformed ``--input-shape``/``--model-kwargs``/
``--policy``) prints argparse's usage line and the error. Exit codes: 0 success,
1 error, 2 bad usage, 3 verification failed, 130 interrupted.

Layout: :mod:`.common` (exit codes, argument types, loading MODEL), :mod:`.commands`,
:mod:`.bench`, :mod:`.quant`, :mod:`.parser`; this module owns :func:`main` (logging, error
reporting, exit codes).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

from ..errors import RepCompilerError, VerificationError
from .common import EXIT_ERROR, EXIT_INTERRUPT, EXIT_OK, EXIT_USAGE, EXIT_VERIFY, PROG
from .parser import build_parser

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_VERIFY", "EXIT_INTERRUPT"]

log = logging.getLogger(__name__)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (so redirected/captured streams work)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # pragma: no cover - a log handler must never raise (logging.Handler's contract)
            self.handleError(record)


@contextlib.contextmanager
def _cli_logging(verbose: int) -> Iterator[None]:
    """Route the library's log records to stderr for one CLI run; restore the logger after."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    pkg = logging.getLogger(__package__.rpartition(".")[0])
    saved = (pkg.level, pkg.propagate)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    pkg.setLevel(level)
    pkg.addHandler(handler)
    pkg.propagate = False
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(saved[0])
        pkg.propagate = saved[1]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return text or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    try:
        with _cli_logging(args.verbose):
            return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPT
    except VerificationError as e:
        if args.debug:
            raise
        sys.stderr.write(f"{PROG}: error: verification failed: {_one_line(e)}\n")
        return EXIT_VERIFY
    except (RepCompilerError, OSError) as e:
        if args.debug:
            raise
        sys.stderr.write(f"{PROG}: error: {_one_line(e)}\n")
        return EXIT_ERROR
    # broad on purpose: the CLI's outermost boundary runs user models and files; an unexpected
    # error (a bug here or in user code) is still one line, the traceback with --debug
    except Exception as e:
        if args.debug:
            raise
        sys.stderr.write(f"{PROG}: error: unexpected {type(e).__name__}: {_one_line(e)} (rerun with --debug "
                         "for the traceback)\n")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
