"""The systems compared in the paper (and α-entmax), as transformer_rela options.

One place that names them, shared by the training scripts, the benchmark, the main job and the tests.
"""

SYSTEMS = {
    "softmax": ["--attn-fn", "softmax"],
    "sparsemax": ["--attn-fn", "sparsemax"],
    "entmax15": ["--attn-fn", "entmax15"],
    "entmax_alpha": ["--attn-fn", "entmax_alpha"],
    "rela_g": ["--attn-fn", "rela", "--rela-variant", "gated"],
    "rela_i": ["--attn-fn", "rela", "--rela-variant", "init"],
}

LABELS = {
    "softmax": "softmax",
    "sparsemax": "sparsemax",
    "entmax15": "1.5-entmax",
    "entmax_alpha": "α-entmax",
    "rela_g": "ReLA-g",
    "rela_i": "ReLA-i",
}


def system_args(system):
    """fairseq-train options of one system; the error names the accepted systems."""
    from .errors import RelaConfigError

    if system not in SYSTEMS:
        raise RelaConfigError(f"unknown system {system!r}; choose one of {', '.join(SYSTEMS)}")
    return list(SYSTEMS[system])


def main(argv=None):
    """``python -m rela_fairseq.systems SYSTEM`` prints the system's options, one per line (for shell scripts)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write(f"usage: python -m rela_fairseq.systems SYSTEM  (SYSTEM: {' '.join(SYSTEMS)})\n")
        return 2
    print("\n".join(system_args(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
