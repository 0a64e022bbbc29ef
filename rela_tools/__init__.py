"""The tools around the rela_fairseq plugin: the reproduction pipeline (``python -m rela_tools.pipeline``, run by
scripts/*.sh), the analyses (``rela-analyze``), checkpoint averaging (``rela-average-checkpoints``), the toy task and
the systems of the paper.

Importing this package imports neither torch nor fairseq: its commands start in a fraction of a second, and set up
logging before fairseq is first imported. The parts that load a model import ``rela_fairseq`` (which registers the
model with fairseq) when they do; the plugin imports only the standard-library modules here (errors, attention types,
the known-warnings filter).
"""
