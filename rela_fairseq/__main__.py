"""``python -m rela_fairseq`` prints the plugin's folder, the value for fairseq's --user-dir."""

import os

print(os.path.dirname(os.path.abspath(__file__)))
