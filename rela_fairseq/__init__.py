"""rela-fairseq: Rectified Linear Attention (Zhang, Titov & Sennrich, EMNLP 2021) as a fairseq plugin.

Use as ``--user-dir rela_fairseq`` (the path of this folder) with ``--arch transformer_rela``. Importing the package
registers the model and its architectures, allow-lists the classes fairseq checkpoints need under torch's
``weights_only`` loading, makes the command-line tools print the plugin's own errors without a traceback, and makes a
resumed fairseq-train train on the batches an uninterrupted run trains on (``resume.py``).
"""

__version__ = "0.3.5"

from rela_tools.quiet import drop_known_log_lines


def plug_into_fairseq() -> None:
    """Register the model and its architectures with fairseq, allow-list fairseq's checkpoint classes, install the
    one-line error hook and make a resumed fairseq-train build the batches an uninterrupted run builds (resume.py).
    Importing the package does this; calling it again changes nothing (each part is idempotent: a module imports
    once, the allow-list is a set, the hook and the batches' wrapper check for themselves)."""
    from rela_tools.errors import install_excepthook

    from . import compat
    from .resume import build_batches_as_from_epoch_one

    compat.allow_fairseq_checkpoints()
    install_excepthook()
    build_batches_as_from_epoch_one()

    from . import models  # noqa: F401  registers transformer_rela and its architectures


drop_known_log_lines()  # before fairseq is imported (here or later): its speech tasks log a tensorboardX hint
plug_into_fairseq()
