"""The AER scorer against the published figures of the shared En-Fr fixture, and its command line."""

import json
import os
import re
import sys

import pytest
from helpers import BIN_DIR, REPO, imported_modules, run_cli

from rela_tools.analyze.aer import AlignmentFileError, format_score, score, score_files

FIXTURE = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "alignment", "enfr")
EXPECTED = re.compile(r"^(\S+): ([\d.]+)% \(([\d.]+)%/([\d.]+)%/(\d+)\)$")


def published(system):
    rows = {}
    with open(os.path.join(FIXTURE, system, "expected-results.txt"), encoding="utf-8") as f:
        for line in f:
            name, aer, p, r, links = EXPECTED.match(line.strip()).groups()
            if os.path.exists(os.path.join(FIXTURE, system, name)):  # *.bpe.word.* rows have no file here
                rows[name] = (float(aer), float(p), float(r), int(links))
    return rows


CASES = [(system, name, expected) for system in ("giza", "fastalign") for name, expected in published(system).items()]


def test_fixture_is_present_and_complete():
    assert len(CASES) == 12, "6 GIZA++ and 6 fast_align hypothesis files, the reversed ones included"
    assert sum("reverse" in name for _, name, _ in CASES) == 2


@pytest.mark.parametrize("system,name,expected", CASES, ids=[f"{s}/{n}" for s, n, _ in CASES])
def test_reproduces_published_figures(system, name, expected):
    result = score_files(os.path.join(FIXTURE, "gold.talp"), os.path.join(FIXTURE, system, name),
                         gold_index_base=1, hyp_index_base=0, reverse_hyp="reverse" in name)
    aer, precision, recall, links = expected
    assert round(100 * result["aer"], 1) == aer
    if system == "giza":
        # GIZA++: every printed figure, link count included
        assert (round(100 * result["precision"], 1), round(100 * result["recall"], 1), result["links"]) == \
               (precision, recall, links)
    else:
        # lilt/alignment-scripts updated the fast_align .talp files after publishing these figures: the files
        # here hold 2-5 links fewer or more than the published counts (and no duplicates), so precision/recall can
        # differ by one in the last printed decimal. AER still matches to the printed decimal.
        assert abs(round(100 * result["precision"], 1) - precision) <= 0.1 + 1e-9
        assert abs(round(100 * result["recall"], 1) - recall) <= 0.1 + 1e-9
        assert abs(result["links"] - links) <= 5


def test_toy_example_from_the_definition():
    gold = [({(0, 0), (1, 1)}, {(0, 0), (1, 1), (2, 1)})]
    r = score(gold, [{(0, 0), (2, 1), (2, 2)}])
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(0.5)
    assert r["aer"] == pytest.approx(1 - (1 + 2) / (3 + 2))


def test_corpus_level_sums_not_sentence_averages():
    gold = [({(0, 0)}, {(0, 0)}), ({(0, 0), (1, 1), (2, 2), (3, 3)}, {(0, 0), (1, 1), (2, 2), (3, 3)})]
    r = score(gold, [set(), {(0, 0), (1, 1), (2, 2), (3, 3)}])
    assert r["recall"] == pytest.approx(4 / 5)  # a sentence average would give 0.5


def test_command_line_output_and_json(tmp_path):
    gold, hyp = os.path.join(FIXTURE, "gold.talp"), os.path.join(FIXTURE, "giza", "test.enfr.talp")
    proc = run_cli("rela-analyze", "aer", gold, hyp, "--gold-index-base", 1, "--hyp-index-base", 0)
    assert proc.stdout.strip() == "AER 8.0% (P 91.4% / R 92.9% / 6069 links)"
    js = json.loads(run_cli("rela-analyze", "aer", gold, hyp, "--json").stdout)
    assert set(js) == {"aer", "precision", "recall", "links"}
    assert 0 <= js["aer"] <= 1 and js["links"] == 6069 and round(js["aer"], 3) == 0.080
    # reversing both sides changes nothing
    both = run_cli("rela-analyze", "aer", gold, hyp, "--reverse-gold", "--reverse-hyp")
    assert both.stdout.strip() == proc.stdout.strip()


def test_the_scorer_and_the_plots_of_saved_statistics_import_neither_fairseq_nor_torch(tmp_path):
    """rela-analyze aer and plot stats/aer read files: they must not wait for fairseq's imports (about 6 s). The
    subcommands that read a model load it through load_model, which registers the plugin (test_analysis_cli.py)."""
    gold, hyp = os.path.join(FIXTURE, "gold.talp"), os.path.join(FIXTURE, "giza", "test.enfr.talp")
    for args in (["aer", gold, hyp, "--gold-index-base", 1], ["plot", "stats", "--help"]):
        proc = run_cli(sys.executable, "-X", "importtime", os.path.join(BIN_DIR, "rela-analyze"), *args)
        imported = imported_modules(proc.stderr)
        assert "rela_tools.analyze.cli" in imported and not {"fairseq", "torch"} & imported, args
    assert proc.stdout.startswith("usage: rela-analyze plot stats")


def test_line_count_mismatch_names_both_files(tmp_path):
    short = tmp_path / "short.talp"
    short.write_text("0-0\n1-1\n")
    proc = run_cli("rela-analyze", "aer", os.path.join(FIXTURE, "gold.talp"), short, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "gold.talp has 447 lines but" in proc.stderr and "short.talp has 2" in proc.stderr


def test_malformed_link_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.talp"
    bad.write_text("0-0 1-1\n2-2 3:3\n")
    with pytest.raises(AlignmentFileError, match=r"bad.talp, line 2: malformed link '3:3'"):
        score_files(str(bad), str(bad), gold_index_base=0)
    zero = tmp_path / "zero.talp"
    zero.write_text("0-1\n")
    with pytest.raises(AlignmentFileError, match="below index base 1"):
        score_files(str(zero), str(zero), gold_index_base=1)


def test_format():
    assert format_score({"aer": 0.1234, "precision": 0.5, "recall": 0.25, "links": 7}) == \
        "AER 12.3% (P 50.0% / R 25.0% / 7 links)"
