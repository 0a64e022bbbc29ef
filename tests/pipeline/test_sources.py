"""Data you can trust: every source cited, every member in the real archives' manifests, prepare --check against a
local server, the paper's batch on any number of devices, no silent staleness, no silent typos."""

import copy
import os
import re

import pytest
from archive_server import manifests, real_config, serve_config, write_local_configs
from helpers import REPO, copy_configs, edit_yaml, pipeline_folders, run_script, script_env

from rela_tools.errors import RelaConfigError
from rela_tools.pipeline.config import available_tasks, load_task

pytestmark = pytest.mark.one_python
DOWNLOAD_TASKS = [t for t in available_tasks() if not real_config(t)["data"].get("generator")]


# --------------------------------------------------------------------------- citations and manifests

@pytest.mark.parametrize("task", DOWNLOAD_TASKS)
def test_every_download_cites_a_public_recipe(task):
    for name, entry in real_config(task)["data"]["downloads"].items():
        assert entry.get("recipes"), f"{task}: download {name} cites no public recipe"
        assert all(isinstance(r, str) and len(r) > 10 for r in entry["recipes"])


@pytest.mark.parametrize("task", DOWNLOAD_TASKS)
def test_every_config_member_is_in_its_archive_manifest(task):
    """The manifests come from the recipes, not from the configs: a member a config invents fails here."""
    config, known = real_config(task), manifests()
    for split in ("train", "valid", "test"):
        for item in config["data"][split]:
            for side in ("src", "tgt"):
                member = item.get(side)
                if member is None:
                    continue  # the download is the text itself
                download = config["data"]["downloads"][item.get(f"{side}_download") or item["download"]]
                key = (download.get("urls") or [download.get("url")])[0]
                assert key in known, f"{task}: {key} has no manifest in tests/data/archive_manifests.yaml"
                assert member in known[key]["members"], f"{task}: {key} holds no member {member!r}"
                assert known[key].get("recipes")


def test_the_manifest_test_catches_an_invented_member():
    config = real_config("wmt16_ro_en")
    known = manifests()
    url = config["data"]["downloads"]["europarl_v8"]["url"]
    assert "training/europarl-v8.ro-en.ro" not in known[url]["members"]  # the old, wrong member path
    assert "training-parallel-ep-v8/europarl-v8.ro-en.ro" in known[url]["members"]


# --------------------------------------------------------------------------- prepare --check

def served_task(task, server, tmp_path, edit=None):
    config = real_config(task)
    serve_config(config, server, server.folder)
    if edit:
        edit(config)
    write_local_configs(task, config, tmp_path / "configs")
    return script_env(tmp_path, RELA_CONFIG_DIR=tmp_path / "configs")


def test_check_verifies_checksums_and_members_without_preparing(server, tmp_path):
    env = served_task("wmt14_en_fr", server, tmp_path)
    proc = run_script("prepare.sh", "wmt14_en_fr", "--check", env=env)
    out = proc.stdout
    assert "md5 ok (a streamed copy)" in out and "members: 2 of 2 found" in out and "FAILED" not in out
    assert not (tmp_path / "data" / "wmt14_en_fr").exists(), "--check prepares nothing"
    assert any(method == "HEAD" for method, _, _ in server.requests)


def test_check_reads_zip_and_tar_member_lists_through_range_requests(server, tmp_path):
    """Over --check-max-mb: the zip central directory and the tar headers come through range requests; a tgz cannot
    be listed without reading it whole, and the report says so."""
    env = served_task("wmt14_en_fr", server, tmp_path)
    proc = run_script("prepare.sh", "wmt14_en_fr", "--check", "--check-max-mb", "0", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    giga = [r for m, n, r in server.requests if n == "training-giga-fren.tar" and m == "GET"]
    assert giga and all(r and r.startswith("bytes=") for r in giga), giga  # never the whole file
    lines = proc.stdout.splitlines()
    giga_status = lines[[i for i, line in enumerate(lines) if "training-giga-fren.tar" in line][0] + 1]
    assert "members: 2 of 2 found" in giga_status and "checksum: not verified" in giga_status
    assert "could not verify:" in proc.stdout and "a compressed archive is read whole" in proc.stdout

    env = served_task("wmt16_ro_en", server, tmp_path)
    proc = run_script("prepare.sh", "wmt16_ro_en", "--check", "--check-max-mb", "0", env=env)
    assert proc.returncode == 0, proc.stdout
    zip_requests = [r for m, n, r in server.requests if n == "setimes2.en-ro.txt.zip" and m == "GET"]
    assert zip_requests and all(r for r in zip_requests)


def test_check_fails_on_a_wrong_member_naming_it(server, tmp_path):
    def wrong(config):
        config["data"]["train"][0]["src"] = "training/europarl-v8.ro-en.ro"  # the member of the WMT17 archive

    env = served_task("wmt16_ro_en", server, tmp_path, wrong)
    proc = run_script("prepare.sh", "wmt16_ro_en", "--check", env=env, check=False)
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout
    assert "training-parallel-ep-v8.tgz has no member 'training/europarl-v8.ro-en.ro'" in proc.stdout
    assert "training-parallel-ep-v8/europarl-v8.ro-en.en" in proc.stdout  # what it does hold


def test_check_fails_on_a_dead_address(server, tmp_path):
    def dead(config):
        config["data"]["downloads"]["wmt16_test"]["url"] = f"{server.base}/gone/test.tgz"

    env = served_task("wmt16_ro_en", server, tmp_path, dead)
    proc = run_script("prepare.sh", "wmt16_ro_en", "--check", env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{server.base}/gone/test.tgz: HTTP 404" in proc.stdout


def test_check_works_offline_against_a_mirror_folder(tmp_path):
    mirror = os.path.join(os.path.dirname(REPO), "shared", "data", "multi30k")
    env = script_env(tmp_path, RELA_DOWNLOAD_MIRROR=mirror)
    proc = run_script("prepare.sh", "multi30k_de_en", "--check", env=env)
    assert proc.stdout.count("sha256 ok (the mirror's copy)") == 6, proc.stdout


# --------------------------------------------------------------------------- the paper's batch

@pytest.mark.parametrize("devices", [1, 2, 3, 8, 16])
def test_tokens_per_update_within_two_percent_and_never_above(devices):
    from rela_tools.pipeline.commands import split_batch

    split = split_batch(25000, 6250, devices, min_tokens=251)
    assert split.max_tokens * split.update_freq * devices == split.actual <= 25000
    assert abs(split.deviation) <= 0.02
    assert split.max_tokens <= 6250
    if devices == 1:
        assert (split.max_tokens, split.update_freq) == (6250, 4)  # the official 6,250 x 4


@pytest.mark.parametrize("task", [t for t in available_tasks() if t != "toy"])
@pytest.mark.parametrize("devices", [1, 2, 3, 8, 16])
def test_every_task_gets_its_batch_in_the_command(task, devices):
    from rela_tools.pipeline.commands import train_command
    from rela_tools.pipeline.runtime import Hardware

    loaded = load_task(task, quick=False)
    args, split = train_command(loaded, "rela_g", hw=Hardware(gpus=devices, fp16=True, nodes=1,
                                                             procs_per_node=devices))
    max_tokens = int(args[args.index("--max-tokens") + 1])
    update_freq = int(args[args.index("--update-freq") + 1])
    target = loaded["train"]["tokens_per_update"]
    assert 0.98 * target <= max_tokens * update_freq * devices <= target


def test_too_many_devices_is_a_clear_error():
    from rela_tools.pipeline.commands import split_batch

    with pytest.raises(RelaConfigError, match="512 devices would get 48 tokens per step each, fewer than the longest"):
        split_batch(25000, 6250, 512, min_tokens=251)


def test_normalisation_keeps_words_apart():
    from rela_tools.pipeline.corpora import normalise

    # control characters separate words (Moses' remove-non-printing-char.perl makes them spaces); deleting them glued
    # "Haus" and "und"
    for control in ("\r", "\x0b", "\x0c", "\x1f", "\x85", "\x00"):
        assert normalise(f"Haus{control}und  Hof") == "Haus und Hof", repr(control)
    # zero-width space and byte-order mark stand between letters; NFC composes
    assert normalise("\ufeffStra\u200bße u\u0308ber\t alles ") == "Straße über alles"


# --------------------------------------------------------------------------- no silent staleness, no silent typos

def test_a_changed_sentencepiece_setting_reruns_that_step_and_the_ones_after(tmp_path):
    configs = copy_configs(tmp_path)
    env = script_env(tmp_path, QUICK=1, RELA_CONFIG_DIR=configs)
    run_script("prepare.sh", "toy", env=env)
    data = tmp_path / "data" / "toy-quick"
    old_dict = (data / "bin" / "dict.src.txt").read_text()
    edit_yaml(configs / "toy.yaml", lambda c: c["quick"]["sentencepiece"].update(vocab_size=200))
    again = run_script("prepare.sh", "toy", env=env)
    log = again.stderr
    assert "[generate] already done" in log
    assert "[sentencepiece] running again: settings changed since the last run (vocab_size: 300 -> 200)" in log
    assert "[encode] running again: [sentencepiece], which it is made from, was run again" in log
    assert "[binarize] running again: [sentencepiece], which it is made from" in log
    assert (data / "bin" / "dict.src.txt").read_text() != old_dict
    # training refuses to resume checkpoints made on the old data
    assert "already done" in run_script("prepare.sh", "toy", env=env).stderr


def test_checkpoints_of_stale_data_are_refused(tmp_path, monkeypatch):
    import torch

    from rela_tools.pipeline import train as train_module
    from rela_tools.pipeline.prepare import prepare

    configs = pipeline_folders(tmp_path, monkeypatch)
    monkeypatch.setattr(train_module, "run_logged", lambda cmd, log: 0)  # what fairseq-train would do: nothing here
    task = load_task("toy", quick=True)
    prepare(task)
    checkpoint_dir = train_module.train(task, "rela_i")
    # a complete archive part-way through training: nothing to repair, updates left to train
    torch.save({"optimizer_history": [{"num_updates": 1}]}, os.path.join(checkpoint_dir, "checkpoint_last.pt"))
    train_module.train(task, "rela_i")  # a resume on the same data is fine
    edit_yaml(configs / "toy.yaml", lambda c: c["quick"]["sentencepiece"].update(vocab_size=200))
    task = load_task("toy", quick=True)
    prepare(task)
    with pytest.raises(RelaConfigError, match=r"the data of toy changed since the checkpoints in .* no longer fit"):
        train_module.train(task, "rela_i")


def test_a_resume_with_the_same_batch_options_warns_of_nothing(tmp_path, monkeypatch, caplog):
    import torch

    from rela_tools.pipeline import train as train_module
    from rela_tools.pipeline.prepare import prepare

    pipeline_folders(tmp_path, monkeypatch)
    monkeypatch.setattr(train_module, "run_logged", lambda cmd, log: 0)
    task = load_task("toy", quick=True)
    prepare(task)
    own_batch = ["--max-tokens", "1000", "--update-freq", "4"]  # the user's split of the same tokens per update
    checkpoint_dir = train_module.train(task, "rela_i", own_batch)
    torch.save({"optimizer_history": [{"num_updates": 1}]}, os.path.join(checkpoint_dir, "checkpoint_last.pt"))
    with caplog.at_level("WARNING"):
        train_module.train(task, "rela_i", own_batch)
    assert "resuming on" not in caplog.text  # the batch recorded is the batch run again
    with caplog.at_level("WARNING"):
        train_module.train(task, "rela_i")  # back to the config's split: that is a change, and it says so
    assert "resuming on 1 device(s) (trained so far on 1): 1000 x 4 x 1 becomes" in caplog.text


def test_checkpoints_of_another_vocabulary_from_the_same_settings_are_refused(tmp_path, monkeypatch):
    """The fingerprint says what the data was made from; a vocabulary that came out otherwise from the same settings
    (the data folder prepared again elsewhere) is caught by the digest of the dictionaries and sentencepiece model,
    by training, evaluation and compare alike. run.json files written before the digest are judged as before."""
    import json

    import torch

    from rela_tools.pipeline import records
    from rela_tools.pipeline import train as train_module
    from rela_tools.pipeline.evaluate import evaluate
    from rela_tools.pipeline.prepare import prepare

    pipeline_folders(tmp_path, monkeypatch)
    monkeypatch.setattr(train_module, "run_logged", lambda cmd, log: 0)
    task = load_task("toy", quick=True)
    prepare(task)
    checkpoint_dir = train_module.train(task, "rela_i")
    torch.save({"optimizer_history": [{"num_updates": 30}]}, os.path.join(checkpoint_dir, "checkpoint_last.pt"))
    assert records.finished_updates(task, "rela_i", 1, task.setting("rela_i")) == 30
    record = json.loads(open(os.path.join(checkpoint_dir, "run.json")).read())
    assert record["data_files"] and record["data"]

    # the same settings, another vocabulary: two dictionary entries trade places
    dictionary = tmp_path / "data" / "toy-quick" / "bin" / "dict.src.txt"
    lines = dictionary.read_text().splitlines(keepends=True)
    dictionary.write_text("".join([lines[1], lines[0], *lines[2:]]))
    with pytest.raises(RelaConfigError, match=r"the data of toy changed since the checkpoints in .* no longer fit"):
        train_module.train(task, "rela_i")
    with pytest.raises(RelaConfigError, match=r"the data of toy changed .* prepare the data as it was to evaluate"):
        evaluate(task, "rela_i")
    assert records.finished_updates(task, "rela_i", 1, task.setting("rela_i")) is None  # train() says why

    # a record from before the digest: the fingerprint alone decides, and the resume records the digest
    del record["data_files"]
    with open(os.path.join(checkpoint_dir, "run.json"), "w") as f:
        json.dump(record, f)
    torch.save({"optimizer_history": [{"num_updates": 10}]}, os.path.join(checkpoint_dir, "checkpoint_last.pt"))
    train_module.train(task, "rela_i")  # resumed (a finished run is not started again: nothing to record)
    assert json.loads(open(os.path.join(checkpoint_dir, "run.json")).read())["data_files"]


def test_compare_reuses_a_result_only_under_the_same_evaluate_settings(tmp_path, monkeypatch, caplog):
    import json

    from rela_tools.pipeline import evaluate as evaluate_module

    pipeline_folders(tmp_path, monkeypatch)
    task = load_task("toy", quick=True)
    os.makedirs(task.checkpoint_dir("softmax"))
    open(os.path.join(task.checkpoint_dir("softmax"), "checkpoint_last.pt"), "w").close()
    evaluations = []

    def fake_evaluate(task, system, seed=None, setting=None, split="test"):  # what evaluate() records of its settings
        evaluations.append(dict(setting.evaluate))
        result = {"system": system, "evaluate_settings": setting.evaluate}
        os.makedirs(os.path.dirname(task.result_path(system, seed)), exist_ok=True)
        with open(task.result_path(system, seed), "w") as f:
            json.dump(result, f)
        return result

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    evaluate_module.evaluate_if_needed(task, "softmax", 1, task.setting("softmax"))
    evaluate_module.evaluate_if_needed(task, "softmax", 1, task.setting("softmax"))
    assert len(evaluations) == 1  # reused
    beam, task["evaluate"]["beam"] = task["evaluate"]["beam"], 5
    with caplog.at_level("INFO"):
        evaluate_module.evaluate_if_needed(task, "softmax", 1, task.setting("softmax"))
    assert len(evaluations) == 2 and evaluations[-1]["beam"] == 5
    assert f"evaluating again, the evaluate settings changed (beam: {beam} -> 5)" in caplog.text
    with open(task.result_path("softmax", 1), "w") as f:  # a result written before the settings were recorded
        json.dump({"system": "softmax", "generation": {"beam": 5, "lenpen": 0.6}}, f)
    evaluate_module.evaluate_if_needed(task, "softmax", 1, task.setting("softmax"))
    assert len(evaluations) == 3


def test_compare_measures_decoding_speed_again_after_the_evaluate_settings_or_checkpoints_change(tmp_path,
                                                                                                monkeypatch):
    import json

    from rela_tools.pipeline import compare, throughput

    pipeline_folders(tmp_path, monkeypatch)
    task = load_task("toy", quick=True)
    for system in ("softmax", "rela_g"):
        os.makedirs(task.checkpoint_dir(system))
        open(os.path.join(task.checkpoint_dir(system), "checkpoint_avg2.pt"), "w").close()
        os.makedirs(os.path.dirname(task.result_path(system)), exist_ok=True)
        with open(task.result_path(system), "w") as f:
            json.dump({"checkpoint": "checkpoint_avg2.pt"}, f)
    measured = []

    def fake_measure(task, checkpoints, **kw):
        measured.append(kw)
        return {"systems": {s: {} for s in checkpoints}, **{k: kw[k] for k in ("updates", "sentences", "rounds")}}

    monkeypatch.setattr(throughput, "measure", fake_measure)
    out = tmp_path / "out"
    out.mkdir()
    systems = ["softmax", "rela_g"]
    compare._speed_if_needed(task, systems, str(out), None)
    compare._speed_if_needed(task, systems, str(out), None)
    assert len(measured) == 1  # reused
    task["evaluate"]["beam"] = task["evaluate"]["beam"] + 1
    compare._speed_if_needed(task, systems, str(out), None)
    assert len(measured) == 2  # decoding with another beam
    os.utime(os.path.join(task.checkpoint_dir("rela_g"), "checkpoint_avg2.pt"), (1, 1))  # evaluated anew
    compare._speed_if_needed(task, systems, str(out), None)
    assert len(measured) == 3


def test_the_results_table_says_how_many_seeds_each_score_comes_from():
    from rela_tools.pipeline.tables import results_table

    def result(system, seed, score):
        return {"task": "wmt16_ro_en", "system": system, "seed": seed, "test_set": "wmt16", "langpair": "ro-en",
                "sacrebleu": {"score": score, "signature": "nrefs:1|case:mixed|eff:no|tok:13a"}}

    table = results_table([result("softmax", 2, 32.0), result("softmax", 1, 30.0), result("rela_g", 2, 29.0),
                            result("sparsemax", 1, 33.5)], paper={"wmt16_ro_en": {"softmax": 32.7}})
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| system")}
    assert rows["softmax"] == "31.0 ± 1.4 (2 seeds) (32.7)"
    assert rows["ReLA-g"] == "29.0 (seed 2)"  # not passed off as the config's seed
    assert rows["sparsemax"] == "33.5"


def test_a_step_after_one_that_ran_again_runs_again(tmp_path, caplog):
    """A step whose record was lost (an interrupted re-run) runs again with the same settings and may write other
    files (sentencepiece from a sample): the steps after it must not keep what they made from the earlier files."""
    from rela_tools.pipeline.prepare import Steps

    ran = []
    for _ in range(2):
        steps = Steps(str(tmp_path))
        for step in ("sentencepiece", "encode"):
            steps.run(step, lambda step=step: ran.append(step), {"setting": 1})
    assert ran == ["sentencepiece", "encode"]  # the second run skipped both
    os.remove(tmp_path / "sentencepiece.done")
    steps = Steps(str(tmp_path))
    with caplog.at_level("WARNING"):
        for step in ("sentencepiece", "encode"):
            steps.run(step, lambda step=step: ran.append(step), {"setting": 1})
    assert ran[2:] == ["sentencepiece", "encode"]
    assert "[encode] running again: [sentencepiece], which it is made from, was run again" in caplog.text


def test_sentencepiece_learns_the_same_vocabulary_from_a_sample_in_every_run(tmp_path):
    """sentencepiece's own sampling (input_sentence_size below the corpus) draws differently in every process; the
    pipeline draws the sample itself, with a fixed seed."""
    configs = copy_configs(tmp_path)
    edit_yaml(configs / "toy.yaml", lambda c: c["quick"]["sentencepiece"].update(input_sentence_size=300))
    vocabularies = []
    for run in ("a", "b"):
        env = script_env(tmp_path / run, QUICK=1, RELA_CONFIG_DIR=configs)
        log = run_script("prepare.sh", "toy", env=env).stderr
        assert "sentencepiece learns from 300 of the 1600 training lines, drawn with seed 1" in log
        spm_dir = tmp_path / run / "data" / "toy-quick" / "spm"
        assert not (spm_dir / "sample.txt").exists()
        vocabularies.append((spm_dir / "spm.vocab").read_text())
    assert vocabularies[0] == vocabularies[1]


def test_the_sentencepiece_sample_is_drawn_with_a_fixed_seed(tmp_path):
    from rela_tools.pipeline.prepare import sentencepiece_sample

    inputs = [tmp_path / "train.de", tmp_path / "train.en"]
    for lang, path in zip(("de", "en"), inputs):
        path.write_text("".join(f"{lang} {i}\n" for i in range(50)))
    inputs = [str(p) for p in inputs]
    assert sentencepiece_sample(inputs, 100, str(tmp_path / "s")) == inputs  # the whole corpus fits
    assert sentencepiece_sample(inputs, 0, str(tmp_path / "s")) == inputs
    samples = []
    for name in ("s1", "s2"):
        assert sentencepiece_sample(inputs, 30, str(tmp_path / name)) == [str(tmp_path / name)]
        samples.append((tmp_path / name).read_text().splitlines())
    assert samples[0] == samples[1] and len(samples[0]) == len(set(samples[0])) == 30
    assert {line.split()[0] for line in samples[0]} == {"de", "en"}  # drawn from both sides


@pytest.mark.parametrize("where,edit,message", [
    ("train", lambda c: c["train"].update(warmup_update=8000),
     "unknown key 'train.warmup_update'; accepted keys under 'train': arch, tokens_per_update"),
    ("download", lambda c: c["data"]["downloads"]["wmt16_test"].update(md55="0" * 32),
     "unknown key 'data.downloads.wmt16_test.md55'; accepted keys under 'data.downloads.wmt16_test': url, urls, md5"),
    ("item", lambda c: c["data"]["train"][0].update(scr="x"),
     "unknown key 'data.train[0].scr'; accepted keys under 'data.train[0]': download, src_download"),
    ("quick", lambda c: c.setdefault("quick", {}).update(sentencepeice={"vocab_size": 10}),
     "unknown key 'quick.sentencepeice'; accepted keys under 'quick': description, src, tgt, data"),
    ("top", lambda c: c.update(evalute={"beam": 5}),
     "unknown key 'evalute'; accepted keys at the top level: description, src, tgt, data"),
    ("type", lambda c: c["train"].update(max_update="many"), "train.max_update = 'many' should be int"),
    ("paper", lambda c: c["paper"].update(rela=1.0), "unknown key 'paper.rela'; accepted keys under 'paper': softmax"),
])
def test_config_typos_are_errors_naming_file_key_and_accepted_keys(tmp_path, monkeypatch, where, edit, message):
    configs = copy_configs(tmp_path)
    edit_yaml(configs / "wmt16_ro_en.yaml", lambda c: c.setdefault("train", {}) and None)
    edit_yaml(configs / "wmt16_ro_en.yaml", edit)
    monkeypatch.setenv("RELA_CONFIG_DIR", str(configs))
    with pytest.raises(RelaConfigError) as info:
        load_task("wmt16_ro_en")
    assert f"{configs / 'wmt16_ro_en.yaml'}: {message}" in str(info.value)


def test_a_config_typo_stops_the_scripts_with_one_line(tmp_path):
    configs = copy_configs(tmp_path)
    edit_yaml(configs / "_defaults.yaml", lambda c: c["train"].update(warmup_update=8000))
    proc = run_script("train.sh", "toy", "rela_g", env=script_env(tmp_path, RELA_CONFIG_DIR=configs), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"rela_fairseq: error: {configs / '_defaults.yaml'}: unknown key 'train.warmup_update'; accepted keys " \
           "under 'train': arch, tokens_per_update, max_tokens, lr, warmup_updates" in proc.stderr


# --------------------------------------------------------------------------- small defects

def test_pipeline_keeps_a_double_dash_that_is_not_the_separator():
    from rela_tools.pipeline.__main__ import fairseq_extra_args

    assert fairseq_extra_args(["--", "--max-update", "5"]) == ["--max-update", "5"]
    assert fairseq_extra_args(["--max-update", "5", "--", "x"]) == ["--max-update", "5", "--", "x"]
    assert fairseq_extra_args([]) == []


def test_the_compare_table_formats_missing_values_and_adds_aer_only_with_gold_alignments():
    from rela_tools.pipeline.tables import compare_table, mean_sd

    def system(label, aer=None):
        per_type = {kind: 0.5 for kind in ("encoder", "decoder", "cross")}
        return {"label": label, "setting": {"describe": "shared", "source": "shared"}, "bleu": mean_sd([30.0]),
                "chrf": mean_sd([50.0]), "brevity_penalty": mean_sd([]), "train_seconds": mean_sd([]),
                "train_speed": None, "decode_speed": 1.0, "sparsity": per_type, "null_rate": per_type,
                "near_null_rate": {}, "js": dict(per_type, cross=None), "aer": aer}

    report = {"task": "toy", "quick": False, "test_set": "local", "signature": "sig", "reference": "softmax",
              "speed": {"updates": 20, "sentences": 200, "rounds": 3}, "systems": {"softmax": system("softmax")}}
    table = compare_table(report)
    row = next(line for line in table.splitlines() if line.startswith("| softmax"))
    # no BP, no train speed, no near-null rate, no JS of cross-attention, no training time: a dash each
    dashes = ("| 30.0 | 50.0 | – | – | 1.00 | 50.0 / 50.0 / 50.0 | 50.0 / 50.0 / 50.0 | – / – / – "
              "| 0.50 / 0.50 / – | – |")
    assert dashes in row, row
    assert "AER" not in table  # no gold alignments
    best = {"aer": 0.25, "layer": 1, "head": "avg"}
    report["systems"]["rela_g"] = system("ReLA-g", {"best_normal": best, "best_shifted": dict(best, head=3)})
    table = compare_table(report)
    assert "| AER % (normal / shifted) |" in table and "| 25.0 (L2 avg) / 25.0 (L2 h3) |" in table
    assert "| – |" in next(line for line in table.splitlines() if line.startswith("| softmax"))


def test_a_failed_training_raises_instead_of_exiting(tmp_path, monkeypatch):
    from rela_tools.pipeline import train as train_module

    monkeypatch.setattr(train_module, "run_logged", lambda cmd, log: 3)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    task = load_task("toy", quick=True)
    os.makedirs(task.bin_dir)
    open(os.path.join(task.bin_dir, "dict.tgt.txt"), "w").close()
    with pytest.raises(train_module.TrainingFailed) as info:
        train_module.train(task, "softmax")
    assert info.value.returncode == 3 and "fairseq-train exited with code 3" in str(info.value)


def test_schema_accepts_every_shipped_config():
    for task in available_tasks():
        loaded = load_task(task, quick=False)
        assert copy.deepcopy(loaded.settings)
        load_task(task, quick=True)


def test_configs_readme_documents_every_key_of_the_schema():
    from rela_tools.pipeline.config import TASK_KEYS, ListOf, MapOf

    def keys(spec):
        if isinstance(spec, (ListOf, MapOf)):
            yield from keys(spec.item if isinstance(spec, ListOf) else spec.value)
        elif isinstance(spec, dict):
            for key, value in spec.items():
                yield key
                yield from keys(value)

    readme = open(os.path.join(REPO, "configs", "README.md"), encoding="utf-8").read()
    documented = {word for span in re.findall(r"`([^`]+)`", readme) for word in re.findall(r"\w+", span)}
    missing = sorted(set(keys(TASK_KEYS)) - documented)
    assert not missing, f"configs/README.md does not document {missing}"


def test_two_downloads_saved_under_one_name_are_an_error(tmp_path, monkeypatch):
    configs = copy_configs(tmp_path)
    edit_yaml(configs / "wmt18_en_fi.yaml", lambda c: c["data"]["downloads"]["wmt18_test"].pop("file"))
    edit_yaml(configs / "wmt18_en_fi.yaml", lambda c: c["data"]["downloads"]["wmt17_test"].pop("file"))
    monkeypatch.setenv("RELA_CONFIG_DIR", str(configs))
    with pytest.raises(RelaConfigError, match="downloads 'wmt17_test' and 'wmt18_test' would both be saved as "
                                              "'test.tgz': give one of them its own 'file' name"):
        load_task("wmt18_en_fi")
