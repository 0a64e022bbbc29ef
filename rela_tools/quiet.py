"""Known harmless third-party warnings, silenced at their source in the project's own commands.

Each entry names the warning's category, the start of its message and the module it is attributed to, so nothing else
is touched: a user's own warnings, other warnings of the same libraries, and every error still show. The pipeline's
scripts and ``rela-analyze`` install the filters in their own process and run fairseq's tools through
``rela_tools/pipeline/fairseq_tool.py``, which installs them too; ``fairseq-train`` run by hand is left as fairseq
made it. Standard library only: fairseq_tool.py loads this file before fairseq is imported.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import NamedTuple


class KnownWarning(NamedTuple):
    category: type[Warning]
    message: str  # the start of the message, literally
    module: str  # a regular expression for the module the warning is attributed to
    why: str  # why it is harmless


KNOWN_WARNINGS = (
    KnownWarning(UserWarning, "\nThe version_base parameter is not specified", r"hydra\..*",
                 "fairseq initialises hydra without version_base; hydra keeps its 1.1 defaults, as fairseq expects"),
    KnownWarning(UserWarning, "\nThe strict flag in the compose API is deprecated", r"hydra\..*",
                 "fairseq's compose call; the flag is ignored"),
    KnownWarning(UserWarning, "In 'config': Usage of deprecated keyword in package header", r"hydra\..*",
                 "'# @package _group_' in fairseq's packaged configs, still honoured"),
    KnownWarning(UserWarning, "\n'config' is validated against ConfigStore schema with the same name", r".*",
                 "fairseq's config layout under hydra >= 1.1 (hydra attributes it to whichever frame calls fairseq, "
                 "'sys:1' from the console script)"),
    KnownWarning(UserWarning, "hydra.experimental.initialize() is no longer experimental", r"hydra\..*",
                 "fairseq imports hydra's old name for initialize"),
    KnownWarning(UserWarning, "hydra.experimental.compose() is no longer experimental", r"hydra\..*",
                 "fairseq imports hydra's old name for compose"),
    KnownWarning(FutureWarning, "`torch.cuda.amp.autocast(args...)` is deprecated", r"fairseq\..*",
                 "fairseq's training step on torch >= 2.4; the old call still works"),
    KnownWarning(UserWarning, "'pin_memory' argument is set as true but no accelerator is found",
                 r"torch\.utils\.data\..*", "fairseq pins memory for its data loaders; on a CPU torch skips it"),
    KnownWarning(UserWarning, "Support for mismatched key_padding_mask and attn_mask is deprecated",
                 r"torch\.nn\.functional", "fairseq's stock softmax path passes a float causal mask beside a bool "
                                           "padding mask; torch converts one to the other"),
)
# fairseq's own log lines that say nothing about the run
KNOWN_LOG_LINES = (
    ("fairseq.tasks.text_to_speech", "Please install tensorboardX"),
)


class _DropLogLine(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_known_warnings() -> None:
    """Silence exactly the known harmless warnings and log lines in this process (and in the processes it forks)."""
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(known.message), category=known.category,
                                module=known.module + r"\Z")
    drop_known_log_lines()


def drop_known_log_lines() -> None:
    """Drop fairseq's log lines that say nothing about the run (filters on their own loggers, nothing else)."""
    for logger_name, start in KNOWN_LOG_LINES:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropLogLine) and f.start == start for f in logger.filters):
            logger.addFilter(_DropLogLine(start))
