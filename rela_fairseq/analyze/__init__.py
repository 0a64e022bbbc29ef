"""Analysis of trained models: attention sparsity, null attention, head diversity, word alignment (AER).

Library use::

    from rela_fairseq.analyze import AlignmentSettings, analyse, load_model
    model, task = load_model("checkpoints/checkpoint_best.pt", "data-bin")
    result = analyse(model, task, "test", AlignmentSettings(gold="test.align"))   # one teacher-forced pass
    result.attention["types"]["cross"]["overall"]["sparsity"], result.alignment["best"]

Command line: ``rela-analyze {attention,align,aer,plot}`` (``python -m rela_fairseq.analyze``).
"""

from .analysis import AlignmentSettings, Analysis, analyse, score_alignments
from .forced import ForcedBatch, forced_batches, load_model, sentence_maps

__all__ = ["AlignmentSettings", "Analysis", "ForcedBatch", "analyse", "forced_batches", "load_model",
           "score_alignments", "sentence_maps"]
