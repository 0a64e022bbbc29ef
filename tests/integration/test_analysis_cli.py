"""rela-analyze end to end on tiny trained checkpoints, through the command line."""

import json
import re

import pytest
from conftest import TINY_SIZES
from helpers import finish_cli, run_cli, start_cli


@pytest.fixture(scope="module")
def rela_checkpoint(trained):
    return trained("rela_g") / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def analysed(trained, toy_bin, toy_raw, tmp_path_factory):
    """{system: (attention JSON file, align JSON file)} from the command line, for softmax and ReLA-g."""
    out = tmp_path_factory.mktemp("analysed")
    files, procs = {}, []
    for system in ("softmax", "rela_g"):
        ckpt = trained(system) / "checkpoint_last.pt"
        attention, align = out / f"{system}.attention.json", out / f"{system}.align.json"
        procs.append((attention, start_cli("rela-analyze", "attention", "--path", ckpt, toy_bin, "--json")))
        procs.append((align, start_cli("rela-analyze", "align", "--path", ckpt, toy_bin, "--gold",
                                       toy_raw / "test.align", "--output-dir", out / system, "--json")))
        files[system] = (attention, align)
    for path, proc in procs:  # side by side: each spends seconds importing fairseq
        path.write_text(finish_cli(proc).stdout)
    return files


def test_attention_json_and_table(rela_checkpoint, toy_bin, analysed):
    js = json.loads(analysed["rela_g"][0].read_text())
    assert js["log_base"].startswith("e")
    assert set(js["types"]) == {"encoder", "decoder", "cross"}
    for data in js["types"].values():
        assert 0 <= data["overall"]["sparsity"] <= 1 and 0 <= data["overall"]["null_rate"] <= 1
        assert len(data["layers"]) == 2 and len(data["layers"][0]["heads"]) == 2  # tiny: 2 layers, 2 heads
    assert js["types"]["encoder"]["overall"]["sparsity"] > 0  # ReLU gives exact zeros
    softmax = json.loads(analysed["softmax"][0].read_text())
    assert all(t["overall"]["sparsity"] == 0 and t["overall"]["null_rate"] == 0 for t in softmax["types"].values())
    table = run_cli("rela-analyze", "attention", "--path", rela_checkpoint, toy_bin).stdout
    assert "cross-attention: sparsity" in table and "JS diversity in nats" in table


def test_stock_fairseq_transformer_checkpoint_is_analysed_as_softmax(toy_bin, tmp_path):
    from helpers import TINY_TRAIN_ARGS

    args = [a if a != "transformer_rela_tiny" else "transformer_tiny" for a in TINY_TRAIN_ARGS]
    run_cli("fairseq-train", toy_bin, *args, "--save-dir", tmp_path, "--max-update", 5)
    js = json.loads(run_cli("rela-analyze", "attention", "--path", tmp_path / "checkpoint_last.pt", toy_bin,
                            "--json").stdout)
    assert js["types"]["cross"]["overall"]["sparsity"] == 0 and js["types"]["cross"]["overall"]["null_rate"] == 0


def test_align_scores_the_gold_and_writes_the_best_alignments(rela_checkpoint, toy_bin, toy_raw, tmp_path, analysed):
    out = tmp_path / "align"
    js = json.loads(analysed["rela_g"][1].read_text())
    assert js["sentences"] == TINY_SIZES["test"] and len(js["rows"]) == 2
    for row in js["rows"]:
        for key in ("best_head_normal", "avg_normal", "best_head_shifted", "avg_shifted"):
            assert 0 <= row[key]["aer"] <= 1
    for path in js["files"].values():
        with open(path) as f:
            lines = f.read().splitlines()
        assert len(lines) == TINY_SIZES["test"]
        # the written file scores as reported
        aer = json.loads(run_cli("rela-analyze", "aer", toy_raw / "test.align", path, "--json").stdout)["aer"]
        best = js["best_normal"] if "best_normal" in path else js["best_shifted"]
        assert aer == pytest.approx(best["aer"])

    # a gold set in the other direction: --swap gives the same scores
    reversed_gold = tmp_path / "reversed.align"
    with open(toy_raw / "test.align") as f, open(reversed_gold, "w") as g:
        for line in f:
            g.write(" ".join(re.sub(r"^(\d+)([-p])(\d+)$", r"\3\2\1", link) for link in line.split()) + "\n")
    swapped = json.loads(run_cli("rela-analyze", "align", "--path", rela_checkpoint, toy_bin, "--gold",
                                 reversed_gold, "--swap", "--output-dir", out, "--json").stdout)
    assert [r["avg_normal"]["aer"] for r in swapped["rows"]] == [r["avg_normal"]["aer"] for r in js["rows"]]
    table = run_cli("rela-analyze", "align", "--path", rela_checkpoint, toy_bin, "--gold", toy_raw / "test.align",
                    "--output-dir", out).stdout
    assert "best head (normal)" in table and "best: layer" in table


def test_align_rejects_a_gold_set_of_the_wrong_size(rela_checkpoint, toy_bin, tmp_path):
    gold = tmp_path / "short.align"
    gold.write_text("1-1\n")
    proc = run_cli("rela-analyze", "align", "--path", rela_checkpoint, toy_bin, "--gold", gold, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"has 1 lines but the subset has {TINY_SIZES['test']} sentences" in proc.stderr


def test_align_reads_word_boundaries_of_unknown_subwords_from_the_subword_text(rela_checkpoint, toy_bin, toy_raw,
                                                                                 tmp_path):
    # the toy test set in BPE style, with a subword outside the model's dictionary glued to each sentence's first
    # word: binarised, it is <unk>, which has lost the "@@" that joins it to that word
    text = tmp_path / "test.bpe"
    for side in ("src", "tgt"):
        lines = (toy_raw / f"test.{side}").read_text().splitlines()
        with open(f"{text}.{side}", "w") as f:
            f.writelines(("zq@@ " if side == "src" else "") + line + "\n" for line in lines)
    data = tmp_path / "bin"
    run_cli("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--testpref", text, "--srcdict",
            toy_bin / "dict.src.txt", "--tgtdict", toy_bin / "dict.tgt.txt", "--destdir", data, "--workers", "1")
    align = ["rela-analyze", "align", "--path", rela_checkpoint, data, "--gold", toy_raw / "test.align",
             "--segmentation", "bpe", "--output-dir", tmp_path / "out"]
    refused = run_cli(*align, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert re.search(r"sentence \d+ has a source subword outside the model's dictionary \(<unk>, position 0\)",
                     refused.stderr)
    assert "--subword-text PREFIX" in refused.stderr
    js = json.loads(run_cli(*align, "--subword-text", text, "--json").stdout)
    assert js["sentences"] == TINY_SIZES["test"]
    with open(js["files"]["best_normal"]) as f:
        for line, gold in zip(f, (toy_raw / "test.align").read_text().splitlines()):
            # the source words are the gold's: "zq@@ yesterday" is one word, so no link points past the last
            n_src = max(int(re.split("[-p]", link)[0]) for link in gold.split())
            assert all(int(link.split("-")[0]) < n_src for link in line.split())


def test_plots(rela_checkpoint, toy_bin, tmp_path, analysed):
    out = tmp_path / "plots"
    heat = run_cli("rela-analyze", "plot", "heatmap", "--path", rela_checkpoint, toy_bin, "--sentence", 0, 3,
                   "--type", "cross", "--output-dir", out, "--pdf").stdout.split()
    assert len(heat) == 2 * 2 * 2  # 2 sentences x 2 layers x (png, pdf)
    stats = {system: files[0] for system, files in analysed.items()}
    aligns = {system: files[1] for system, files in analysed.items()}
    written = run_cli("rela-analyze", "plot", "stats", *(f"{k}={v}" for k, v in stats.items()),
                      "--output-dir", out).stdout.split()
    written += run_cli("rela-analyze", "plot", "aer", *(f"{k}={v}" for k, v in aligns.items()),
                       "--output", out / "aer.png").stdout.split()
    assert [p.split("/")[-1] for p in written] == ["sparsity.png", "null_rate.png", "aer.png"]
    for path in heat + written:
        with open(path, "rb") as f:
            head = f.read(8)
        assert head.startswith(b"\x89PNG") or head.startswith(b"%PDF")


def test_heatmap_rejects_a_sentence_outside_the_subset(rela_checkpoint, toy_bin, tmp_path):
    proc = run_cli("rela-analyze", "plot", "heatmap", "--path", rela_checkpoint, toy_bin, "--sentence", 999,
                   "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "--sentence 999" in proc.stderr and "Traceback" not in proc.stderr
