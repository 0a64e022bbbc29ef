"""Errors that explain themselves.

Every error the plugin raises on bad input is a ``RelaFairseqError`` whose message names the bad value and what is
accepted. When the plugin is loaded into a command-line tool (``fairseq-train``, ``fairseq-generate``, ``rela-analyze``
...), such an error is printed as one line instead of a traceback, even when fairseq re-raises it wrapped in its own
exception (the trainer turns every ``load_state_dict`` failure into "Cannot load model parameters ...").
"""

import sys


class RelaFairseqError(Exception):
    """An error whose message is complete on its own."""


class RelaConfigError(RelaFairseqError, ValueError):
    """An option has a value outside its choices (when argparse did not already catch it, e.g. --model-overrides)."""


class AttentionSettingsError(RelaFairseqError):
    """A checkpoint's attention settings differ from those of the model it is loaded into."""


class MissingDependencyError(RelaFairseqError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""

    def __init__(self, package, needed_for, install=None):
        install = install or f"pip install {package}"
        super().__init__(f"{needed_for} needs the '{package}' package, which is not installed; install it with: "
                         f"{install}")


def require(module_name, needed_for, package=None, install=None):
    """Import ``module_name`` or raise a MissingDependencyError naming the install command."""
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingDependencyError(package or module_name, needed_for, install) from exc


def _own_error_in_chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RelaFairseqError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_excepthook():
    """Print our own errors (also when wrapped by fairseq) as one line; leave every other error alone."""
    previous = sys.excepthook
    if getattr(previous, "_rela_fairseq", False):
        return

    def hook(exc_type, exc, tb):
        own = _own_error_in_chain(exc)
        if own is None:
            previous(exc_type, exc, tb)
            return
        sys.stderr.write(f"rela_fairseq: error: {own}\n")

    hook._rela_fairseq = True  # type: ignore[attr-defined]
    sys.excepthook = hook
