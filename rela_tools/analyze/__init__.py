"""Analysis of trained models: attention sparsity, null attention, head diversity, word alignment (AER).

Library use::

    from rela_tools.analyze import AlignmentSettings, analyse, load_model
    model, task = load_model("checkpoints/checkpoint_best.pt", "data-bin")
    result = analyse(model, task, "test", AlignmentSettings(gold="test.align"))   # one teacher-forced pass
    result.attention["types"]["cross"]["overall"]["sparsity"], result.alignment["best"]

Command line: ``rela-analyze {attention,align,aer,plot}`` (``python -m rela_tools.analyze``).
"""

import importlib
from typing import Any, List

# soft switch-off (metrics.py): a query row whose weights sum to less than NEAR_NULL_MASS counts as near-null; the
# row-mass histogram's left edges (the last bin is open). Here, without torch: rela-analyze's text output reads them.
NEAR_NULL_MASS = 0.01
MASS_BINS = (0.0, 1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0)

# Imported on first use (PEP 562): the model-reading half needs torch and fairseq, which rela-analyze's AER scorer and
# its plots of saved statistics never touch (rela_fairseq/__init__.py).
_EXPORTS = {"AlignmentSettings": "analysis", "Analysis": "analysis", "analyse": "analysis",
            "score_alignments": "analysis", "ForcedBatch": "forced", "forced_batches": "forced",
            "load_model": "forced", "sentence_maps": "forced"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
