"""The systems the paper compares (and α-entmax), and three controls beyond it, as data: one place that names them,
with their labels and the ``transformer_rela`` options that make each. The pipeline, the benchmark
(benchmarks/speed.py) and the tests read them from here."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RelaConfigError


@dataclass(frozen=True)
class System:
    name: str  # as in scripts and file names: rela_g
    label: str  # as in tables: ReLA-g
    options: dict = field(default_factory=dict)  # transformer_rela options (argparse destinations) and values
    paper: bool = True  # one of the paper's: compare.sh, tune.sh and the benchmark run these unless told otherwise

    def fairseq_args(self) -> list[str]:
        """The options as ``fairseq-train`` arguments: ``["--attn-fn", "rela", "--rela-variant", "gated"]``."""
        args: list[str] = []
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is not False:
                args += [flag, str(value)]
        return args


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("softmax", "softmax", {"attn_fn": "softmax"}),
    System("sparsemax", "sparsemax", {"attn_fn": "sparsemax"}),
    System("entmax15", "1.5-entmax", {"attn_fn": "entmax15"}),
    System("entmax_alpha", "α-entmax", {"attn_fn": "entmax_alpha"}),
    System("rela_g", "ReLA-g", {"attn_fn": "rela", "rela_variant": "gated"}),
    System("rela_i", "ReLA-i", {"attn_fn": "rela", "rela_variant": "init"}),
    # controls beyond the paper: functions that can also put (almost) no weight anywhere, without a norm or gate
    System("sigmoid", "sigmoid", {"attn_fn": "sigmoid"}, paper=False),
    System("relu_len", "ReLU/n", {"attn_fn": "relu_len"}, paper=False),
    System("softmax_null", "softmax+null", {"attn_fn": "softmax_null"}, paper=False),
)}
PAPER_SYSTEMS: tuple[str, ...] = tuple(name for name, system in SYSTEMS.items() if system.paper)
LABELS: dict[str, str] = {name: system.label for name, system in SYSTEMS.items()}


def get_system(name: str) -> System:
    """The system called ``name``; the error names the accepted systems."""
    if name not in SYSTEMS:
        raise RelaConfigError(f"unknown system {name!r}; choose one of {', '.join(SYSTEMS)}")
    return SYSTEMS[name]

