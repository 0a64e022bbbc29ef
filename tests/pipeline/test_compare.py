"""Multi30k from the offline mirror, and scripts/compare.sh end to end on a QUICK run of two systems."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, run_script, script_env

MIRROR = os.path.join(os.path.dirname(REPO), "shared", "data", "multi30k")


@pytest.mark.one_python
def test_multi30k_prepares_from_the_mirror_with_its_checksums(tmp_path):
    proc = run_script("prepare.sh", "multi30k_de_en", env=script_env(tmp_path, RELA_DOWNLOAD_MIRROR=MIRROR))
    data = tmp_path / "data" / "multi30k_de_en"
    for split, n in (("train", 29000), ("valid", 1014), ("test", 1000)):
        for lang in ("de", "en"):
            assert len((data / "raw" / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()) == n
    assert len((data / "raw" / "test.ref").read_text(encoding="utf-8").splitlines()) == 1000
    with open(os.path.join(REPO, "configs", "multi30k_de_en.yaml")) as f:
        downloads = yaml.safe_load(f)["data"]["downloads"]
    for entry in downloads.values():  # every download is the mirror's file, as the config's sha256 says
        path = data / "downloads" / os.path.basename(entry["url"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert (data / "bin" / "dict.en.txt").exists() and "valid: kept 1014 of 1014 pairs" in proc.stderr


@pytest.mark.one_python
def test_a_corrupted_mirror_file_is_a_clear_error_and_leaves_nothing_half_written(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR, mirror)
    data = bytearray((mirror / "val.en.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (mirror / "val.en.gz").write_bytes(bytes(data))
    proc = run_script("prepare.sh", "multi30k_de_en", env=script_env(tmp_path, RELA_DOWNLOAD_MIRROR=mirror, QUICK=1),
                      check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "val.en.gz: sha256 checksum mismatch (expected 14f7d25d" in proc.stderr
    downloads = tmp_path / "data" / "multi30k_de_en-quick" / "downloads"
    assert not (downloads / "val.en.gz").exists() and not (downloads / "val.en.gz.part").exists()
    assert not (tmp_path / "data" / "multi30k_de_en-quick" / "raw").exists()


# scripts/compare.sh is the pipeline's logic around fairseq's tools, which the other tests run under both fairseq
# versions (test_cli, test_models, test_checkpoints): its end-to-end run (minutes) happens once, under Python 3.11
@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """tune.sh (QUICK: two grid points per system), then compare.sh at the points it chose."""
    root = tmp_path_factory.mktemp("compare")
    env = script_env(root, QUICK=1, RELA_DOWNLOAD_MIRROR=MIRROR)
    tuned = run_script("tune.sh", "multi30k_de_en", "softmax", "rela_g", env=env)
    first = run_script("compare.sh", "multi30k_de_en", "softmax", "rela_g", env=env)
    return root, env, first, tuned


@pytest.mark.one_python
def test_tune_trains_each_grid_point_into_its_own_folder_and_scores_on_validation_only(compared):
    root, _, _, tuned = compared
    tune_dir = root / "results" / "multi30k_de_en-quick" / "tune"
    table = (tune_dir / "tune.md").read_text()
    assert table in tuned.stdout
    assert "| system | lr | warmup_updates | lenpen | seeds | valid BLEU | valid loss |" in table
    report = json.loads((tune_dir / "tune.json").read_text())
    for system in ("softmax", "rela_g"):
        points = report["systems"][system]["points"]
        assert [p["train"] for p in points] == [{"lr": 0.003, "warmup_updates": 300},
                                                {"lr": 0.003, "warmup_updates": 600}]
        assert sum(p["chosen"] for p in points) == 1 and all(p["valid_loss"]["mean"] for p in points)
        for name in (f"{system}@lr=0.003,warmup_updates=300", f"{system}@lr=0.003,warmup_updates=600"):
            assert (root / "checkpoints" / "multi30k_de_en-quick" / name / "checkpoint_last.pt").exists()
    chosen = json.loads((tune_dir / "tuned.json").read_text())["systems"]
    assert set(chosen) == {"softmax", "rela_g"}
    # the validation set only: its hypotheses per run, and every fairseq-generate tune started decoded "valid"
    assert all(len((tune_dir / "valid" / name).read_text().splitlines()) == 200  # QUICK: 200 of 1,014
               for name in os.listdir(tune_dir / "valid") if name.endswith(".hyp"))
    decodes = [line for line in tuned.stderr.splitlines() if "running: " in line and "fairseq-generate" in line]
    assert len(decodes) == 4 and all("--gen-subset valid " in line for line in decodes), decodes
    assert "fairseq-train" in tuned.stderr


@pytest.mark.one_python
def test_compare_runs_each_system_at_its_tuned_setting_with_curves_and_significance(compared):
    root, _, first, _ = compared
    assert first.stderr.count("trained already") == 2  # tune.sh's runs of the chosen points
    report = json.loads((root / "results" / "multi30k_de_en-quick" / "compare" / "compare.json").read_text())
    for system in ("softmax", "rela_g"):
        s = report["systems"][system]
        assert s["setting"]["source"] == "tuned" and s["setting"]["describe"].startswith("lr 0.003, warmup_updates")
        curve = s["runs"][0]["curve"]
        assert [p["updates"] for p in curve if p["valid_bleu"] is not None] == [10, 20]
        assert all(p["valid_loss"] is not None for p in curve) and s["brevity_penalty"]["mean"] is not None
    test = report["systems"]["rela_g"]["significance"]
    assert 0 < test["per_seed"]["1"]["p_value"] <= 1 and test["pooled"] is None  # one seed: nothing pooled
    assert "significance" in report["systems"]["softmax"] and report["systems"]["softmax"]["significance"] is None
    assert os.path.exists(root / "results" / "multi30k_de_en-quick" / "compare" / "learning_curves.png")


@pytest.mark.one_python
def test_compare_prints_the_table_and_writes_json_and_plots(compared):
    root, _, first, _ = compared
    out_dir = root / "results" / "multi30k_de_en-quick" / "compare"
    table = (out_dir / "compare.md").read_text()
    assert table in first.stdout
    header = table.splitlines()[0]
    for column in ("setting", "BLEU", "chrF", "BP", "train ×softmax", "decode ×softmax", "sparsity % (enc/dec/cross)",
                   "null rate % (enc/dec/cross)", "JS nats (enc/dec/cross)"):
        assert column in header
    rows = [line for line in table.splitlines() if line.startswith("| softmax") or line.startswith("| ReLA-g")]
    assert len(rows) == 2 and not any("–" in row for row in rows), rows  # every column filled
    report = json.loads((out_dir / "compare.json").read_text())
    for system in ("softmax", "rela_g"):
        s = report["systems"][system]
        assert s["bleu"]["mean"] is not None and s["chrf"]["mean"] is not None and s["bleu"]["n"] == 1
        assert s["train_speed"] > 0 and s["decode_speed"] > 0
        for metric in ("sparsity", "null_rate", "js"):
            assert set(s[metric]) == {"encoder", "decoder", "cross"} and None not in s[metric].values()
    assert report["systems"]["softmax"]["sparsity"]["cross"] == 0.0
    assert report["systems"]["rela_g"]["sparsity"]["cross"] > 0.0
    assert report["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    plots = set(os.listdir(out_dir))
    assert {"sparsity.png", "null_rate.png", "cross_sentence0_layer1.png"} <= plots


@pytest.mark.one_python
def test_compare_again_trains_nothing(compared):
    root, env, first, _ = compared
    again = run_script("compare.sh", "multi30k_de_en", "softmax", "rela_g", env=env)
    assert "fairseq-train" not in again.stderr + again.stdout and "fairseq-generate" not in again.stderr
    assert again.stderr.count("trained already") == 2 and "speed measured already" in again.stderr
    assert (root / "results" / "multi30k_de_en-quick" / "compare" / "compare.md").read_text() in again.stdout


@pytest.mark.parametrize("argv", [
    ["compare", "multi30k_de_en", "--seeds", "2", "softmax", "rela_g"],
    ["compare", "multi30k_de_en", "softmax", "rela_g", "--seeds", "2"],
    ["compare", "--seeds", "2", "multi30k_de_en", "softmax", "rela_g"],
])
def test_compare_takes_its_options_anywhere(argv):
    from rela_tools.pipeline.__main__ import parse_args

    args = parse_args(argv)
    assert (args.task, args.systems, args.seeds) == ("multi30k_de_en", ["softmax", "rela_g"], 2)


def test_compare_still_rejects_an_unknown_option(capsys):
    from rela_tools.pipeline.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["compare", "multi30k_de_en", "--beam", "2", "softmax"])
    assert "unrecognized arguments: --beam 2 softmax" in capsys.readouterr().err


@pytest.mark.parametrize("argv,seed,mirror,extra", [
    (["train", "toy", "rela_g", "--seed", "3"], 3, None, []),
    (["train", "toy", "rela_g", "--lr", "1e-3", "--seed=3"], 3, None, ["--lr", "1e-3"]),
    (["train", "toy", "rela_g", "--", "--seed", "4", "--lr", "3"], 4, None, ["--lr", "3"]),
    (["reproduce", "toy", "rela_g", "--mirror", "/x", "--lr", "2"], None, "/x", ["--lr", "2"]),
    (["train", "toy", "--seed", "3", "rela_g", "--lr", "2"], 3, None, ["--lr", "2"]),
])
def test_the_pipelines_own_options_are_taken_from_among_the_extra_fairseq_options(argv, seed, mirror, extra):
    """After SYSTEM, argparse gives everything to fairseq-train: there --seed 3 trained seed 3 into SYSTEM/ (or, once
    seed 1 finished there, resumed it and trained nothing) and --mirror failed."""
    from rela_tools.pipeline.__main__ import fairseq_extra_args, parse_args

    args = parse_args(argv)
    assert (args.seed, getattr(args, "mirror", None), fairseq_extra_args(args.fairseq_args)) == (seed, mirror, extra)


def test_compare_refuses_a_system_given_twice():
    from rela_tools.errors import RelaFairseqError
    from rela_tools.pipeline.__main__ import main

    with pytest.raises(RelaFairseqError, match="softmax is given twice"):
        main(["compare", "toy", "softmax", "rela_g", "softmax"])


@pytest.mark.one_python
def test_speed_end_to_end_times_fairseq_itself_on_the_trained_task(compared):
    """benchmarks/speed.py --end-to-end: fairseq-train's words/s and fairseq-generate's sentences/s from their own
    logs, ReLA-g also with RELA_FAIRSEQ_KERNEL=eager; a system without a trained checkpoint is a clear error."""
    root, env, _, _ = compared
    speed = [sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--end-to-end", "multi30k_de_en"]
    out = root / "e2e.json"
    proc = subprocess.run([*speed, "--systems", "rela_g", "--extra", "rela_g_eager", "--repeats", "1",
                           "--e2e-updates", "4", "--e2e-sentences", "20", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| system | fairseq-train words/s | train × softmax | fairseq-generate sentences/s |" in proc.stdout
    measured = json.loads(out.read_text())["results"]
    assert set(measured) == {"softmax", "rela_g", "rela_g_eager"}
    for name, row in measured.items():
        assert row["train_wps_median"] > 0 and row["decode_sps_median"] > 0, name
        # the 20 sentences asked for, not the whole test set (fairseq-generate ignores its --num-shards)
        assert row["decoded_sentences"] == 20, row
    assert measured["softmax"]["train_ratio"] == 1.0
    missing = subprocess.run([*speed, "--systems", "rela_i"], env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "rela_i has no trained checkpoint" in missing.stderr
    assert "scripts/compare.sh multi30k_de_en" in missing.stderr and "Traceback" not in missing.stderr
