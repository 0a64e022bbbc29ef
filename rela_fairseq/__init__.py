"""rela-fairseq: Rectified Linear Attention (Zhang, Titov & Sennrich, EMNLP 2021) as a fairseq plugin.

Use as ``--user-dir rela_fairseq`` (the path of this folder) with ``--arch transformer_rela``. Importing the package
registers the model and its architectures, allow-lists the classes fairseq checkpoints need under torch's
``weights_only`` loading, and makes the command-line tools print the plugin's own errors without a traceback.
"""

__version__ = "0.1.0"

from . import compat
from .errors import install_excepthook

compat.allow_fairseq_checkpoints()
install_excepthook()

from . import models  # noqa: E402  registers transformer_rela and its architectures
