"""rela-fairseq: Rectified Linear Attention (Zhang, Titov & Sennrich, EMNLP 2021) as a fairseq plugin.

Use as ``--user-dir rela_fairseq`` (the path of this folder) with ``--arch transformer_rela``. Importing the package
registers the model and its architectures, allow-lists the classes fairseq checkpoints need under torch's
``weights_only`` loading, and makes the command-line tools print the plugin's own errors without a traceback.
"""

__version__ = "0.3.1"

import importlib.util

from .quiet import drop_known_log_lines

# Without fairseq (a fresh clone, before scripts/setup_env.sh) only the parts that need none of it import: the
# pipeline's command-line help. Where fairseq is installed, every import error below shows as it is.
if importlib.util.find_spec("fairseq") is not None:
    drop_known_log_lines()  # before fairseq is imported: its speech tasks log an install hint for tensorboardX

    from . import compat
    from .errors import install_excepthook

    compat.allow_fairseq_checkpoints()
    install_excepthook()

    from . import models  # noqa: F401  registers transformer_rela and its architectures
