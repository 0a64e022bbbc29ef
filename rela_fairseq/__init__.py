"""rela-fairseq: Rectified Linear Attention (Zhang, Titov & Sennrich, EMNLP 2021) as a fairseq plugin.

Use as ``--user-dir rela_fairseq`` (the path of this folder) with ``--arch transformer_rela``. Importing the package
registers the model and its architectures, allow-lists the classes fairseq checkpoints need under torch's
``weights_only`` loading, makes the command-line tools print the plugin's own errors without a traceback, and makes a
resumed fairseq-train train on the batches an uninterrupted run trains on (``resume.py``).
"""

__version__ = "0.3.5"

import importlib.util
import os
import sys

from .quiet import drop_known_log_lines


def plug_into_fairseq() -> None:
    """Register the model and its architectures with fairseq, allow-list fairseq's checkpoint classes, install the
    one-line error hook and make a resumed fairseq-train build the batches an uninterrupted run builds (resume.py).
    Importing the package does this; calling it again changes nothing (each part is idempotent: a module imports
    once, the allow-list is a set, the hook and the batches' wrapper check for themselves)."""
    from . import compat
    from .errors import install_excepthook
    from .resume import build_batches_as_from_epoch_one

    compat.allow_fairseq_checkpoints()
    install_excepthook()
    build_batches_as_from_epoch_one()

    from . import models  # noqa: F401  registers transformer_rela and its architectures


# The project's own commands that need fairseq for only part of their work: the scripts' driver (it runs fairseq's
# tools as processes of their own) and rela-analyze (AER and plots read files). Importing fairseq (torch, hydra, and
# scikit-learn through fairseq.tasks) costs them about 6 s, also for --help or a mistyped task; where they do use
# fairseq in their own process (loading a model), rela_fairseq.analyze.load_model calls plug_into_fairseq.
SELF_SETUP_MODULES = ("rela_fairseq.pipeline", "rela_fairseq.analyze")
SELF_SETUP_SCRIPTS = ("rela-analyze",)  # console scripts (setup.py)


def _main_sets_fairseq_up_itself() -> bool:
    """Whether this process runs one of those commands: ``python -m MODULE`` (the interpreter's own command line,
    Python >= 3.10) or the console script (its path is sys.argv[0] before it imports anything)."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv:
        module = argv.index("-m") + 1
        return module < len(argv) and argv[module] in SELF_SETUP_MODULES
    return bool(sys.argv) and os.path.basename(sys.argv[0]) in SELF_SETUP_SCRIPTS


drop_known_log_lines()  # before fairseq is imported (here or later): its speech tasks log a tensorboardX hint


# Without fairseq (a fresh clone, before scripts/setup_env.sh) only the parts that need none of it import: the
# pipeline's command-line help. Where fairseq is installed, every import error below shows as it is.
if importlib.util.find_spec("fairseq") is not None and not _main_sets_fairseq_up_itself():
    plug_into_fairseq()
