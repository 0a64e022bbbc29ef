"""Paired bootstrap resampling of every system against a reference system (softmax) on the test set, with SacreBLEU's
own test (``sacrebleu.significance.PairedTest``, test_type "bs": Koehn 2004; its seed is SacreBLEU's fixed default,
so a re-run gives the same p-values).

Per seed: the system's run of the i-th seed against the reference's run of the i-th seed. Pooled over the seeds:
each system's hypotheses of all its seeds one after the other, against the reference's of the same seeds in the same
order, the references repeated as often: one test on the seed-pooled outputs, defined where both systems have runs
of the same seeds.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
SAMPLES = 1000  # SacreBLEU's default number of resamples for --paired-bs
SIGNIFICANT = 0.05


def paired_bootstrap(reference_hyps: list[str], system_hyps: list[str], refs: list[str],
                     samples: int = SAMPLES) -> dict:
    """{"p_value", "reference_bleu", "system_bleu"}: whether ``system_hyps`` differ from ``reference_hyps`` in BLEU
    more than resampling the sentences explains (the p-value of SacreBLEU's paired bootstrap test)."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest, Result

    if not len(reference_hyps) == len(system_hyps) == len(refs):
        raise ValueError(f"paired test of {len(system_hyps)} against {len(reference_hyps)} hypotheses for "
                         f"{len(refs)} references: the outputs are not of the same test set")
    # SacreBLEU gives a tie its smallest p-value, 1/(samples + 1), as MultEval does; identical outputs differ by nothing
    if reference_hyps == system_hyps:
        from sacrebleu.metrics import BLEU

        same = round(BLEU().corpus_score(system_hyps, [refs]).score, 2)
        return {"p_value": 1.0, "reference_bleu": same, "system_bleu": same, "samples": samples}
    quiet = logging.getLogger("sacrebleu")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs each pre-computation
    try:
        _, scores = PairedTest([("reference", reference_hyps), ("system", system_hyps)], {"BLEU": BLEU()}, [refs],
                               test_type="bs", n_samples=samples)()
    finally:
        quiet.setLevel(level)
    reference, system = scores["BLEU"]
    assert isinstance(reference, Result) and isinstance(system, Result) and system.p_value is not None
    return {"p_value": round(float(system.p_value), 4), "reference_bleu": round(reference.score, 2),
            "system_bleu": round(system.score, 2), "samples": samples}


def compare_to_reference(hyps: dict[str, dict[int, list[str]]], refs: list[str], reference: str) -> dict:
    """{system: {"per_seed": {seed: test}, "pooled": test or None}} for every system but ``reference``, from
    ``hyps`` ({system: {seed: hypotheses}})."""
    base = hyps[reference]
    out = {}
    for system, by_seed in hyps.items():
        if system == reference:
            continue
        shared = [seed for seed in by_seed if seed in base]
        per_seed = {seed: paired_bootstrap(base[seed], by_seed[seed], refs) for seed in shared}
        pooled = None
        if len(shared) > 1:
            pooled = paired_bootstrap([h for seed in shared for h in base[seed]],
                                      [h for seed in shared for h in by_seed[seed]], refs * len(shared))
            pooled["seeds"] = shared
        out[system] = {"per_seed": per_seed, "pooled": pooled}
    return out


def mark(test: dict | None) -> str:
    """The table's mark of one system against the reference: † where the pooled (else the only seed's) difference is
    significant at p < 0.05, '' otherwise."""
    if not test:
        return ""
    decisive = test["pooled"] or (next(iter(test["per_seed"].values())) if len(test["per_seed"]) == 1 else None)
    return " †" if decisive and decisive["p_value"] < SIGNIFICANT else ""
