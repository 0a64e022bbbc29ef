"""Per-system settings, tune.sh's grid and choice, the learning curves' log reading and the paired bootstrap test:
the logic, without training (tests/pipeline/test_compare.py runs tune.sh and compare.sh end to end)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import edit_yaml, pipeline_folders

from rela_tools.errors import MissingDependencyError, RelaConfigError
from rela_tools.pipeline.config import load_task


def write_tuned(task, systems):
    os.makedirs(task.tune_dir, exist_ok=True)
    with open(os.path.join(task.tune_dir, "tuned.json"), "w") as f:
        json.dump({"systems": systems}, f)
    task._tuned = None


# --------------------------------------------------------------------------- one system's settings

def test_a_system_setting_is_shared_then_config_then_tuned(tmp_path, monkeypatch):
    configs = pipeline_folders(tmp_path, monkeypatch)
    edit_yaml(configs / "toy.yaml", lambda c: c.update(systems={"rela_g": {"train": {"warmup_updates": 50},
                                                                           "evaluate": {"lenpen": 1.0}}}))
    task = load_task("toy")
    shared = task.setting("softmax")
    assert (shared.overrides, shared.source, shared.tag) == ({"train": {}, "evaluate": {}}, "shared", "")
    assert task.run_name("softmax") == "softmax" and task.run_name("softmax", 2) == "softmax-seed2"

    configured = task.setting("rela_g")
    assert configured.train["warmup_updates"] == 50 and configured.evaluate["lenpen"] == 1.0
    assert configured.train["lr"] == task["train"]["lr"] and configured.source == "config"
    assert task.run_name("rela_g") == "rela_g@warmup_updates=50"  # its own folder: never the shared run's
    assert task.run_name("rela_g", 3) == "rela_g@warmup_updates=50-seed3"

    # tune.sh's choice comes on top; what the config pins wins; values equal to the shared ones are no overrides
    write_tuned(task, {"rela_g": {"train": {"lr": 0.001, "warmup_updates": 100}, "evaluate": {"lenpen": 0.6}},
                       "softmax": {"train": {"lr": task["train"]["lr"]}, "evaluate": {}}})
    tuned = task.setting("rela_g")
    assert tuned.overrides == {"train": {"warmup_updates": 50, "lr": 0.001}, "evaluate": {"lenpen": 1.0}}
    assert tuned.source == "config+tuned" and tuned.tag == "lr=0.001,warmup_updates=50"
    assert tuned.describe() == "warmup_updates 50, lr 0.001, lenpen 1"
    assert task.setting("softmax").source == "shared" and task.run_name("softmax") == "softmax"
    assert task.setting("rela_g", tuned=False).source == "config"
    task.use_tuned = False  # compare --shared-setting
    assert task.setting("rela_g").overrides["train"] == {"warmup_updates": 50}

    # a grid point replaces the tuned choice, keeps what the config pins
    point = task.setting("softmax", point={"train": {"lr": 0.004}, "evaluate": {"lenpen": 1.0}})
    assert (point.tag, point.source, point.evaluate["lenpen"]) == ("lr=0.004", "grid", 1.0)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(systems={"rela_x": {"train": {"lr": 0.1}}}),
     r"unknown key 'systems.rela_x'; accepted keys under 'systems': softmax, sparsemax"),
    (lambda c: c.update(systems={"rela_g": {"train": {"learning_rate": 0.1}}}),
     r"unknown key 'systems.rela_g.train.learning_rate'"),
    (lambda c: c.update(systems={"rela_g": {"evaluate": {"lenpen": "long"}}}),
     r"systems.rela_g.evaluate.lenpen = 'long' should be int or float"),
    (lambda c: c["tune"]["grid"]["train"].update(arch=["transformer_rela"]),
     r"unknown key 'tune.grid.train.arch'; accepted keys under 'tune.grid.train': lr, warmup_updates"),
    (lambda c: c["tune"]["grid"]["train"].update(warmup_updates=[100, 0.5]),
     r"tune.grid.train.warmup_updates\[1\] = 0.5 should be int"),
    (lambda c: c["tune"]["grid"]["train"].update(lr=[]), r"tune.grid.train.lr is empty"),
    (lambda c: c["tune"]["grid"]["evaluate"].update(lenpen=[1.0, 1.0]), r"tune.grid.evaluate.lenpen = \[1.0, 1.0\] "
                                                                         r"names a value twice"),
])
def test_a_bad_system_setting_or_grid_is_an_error_naming_it(tmp_path, monkeypatch, edit, message):
    configs = pipeline_folders(tmp_path, monkeypatch)
    edit_yaml(configs / "toy.yaml", edit)
    with pytest.raises(RelaConfigError, match=message):
        load_task("toy")


def test_a_resume_refuses_checkpoints_of_other_training_settings_but_not_other_bookkeeping(tmp_path, monkeypatch):
    import torch

    from rela_tools.pipeline import train as train_module
    from rela_tools.pipeline.prepare import prepare

    configs = pipeline_folders(tmp_path, monkeypatch)
    monkeypatch.setattr(train_module, "run_logged", lambda cmd, log: 0)
    task = load_task("toy", quick=True)
    prepare(task)
    checkpoint_dir = train_module.train(task, "softmax")
    torch.save({"optimizer_history": [{"num_updates": 10}]}, os.path.join(checkpoint_dir, "checkpoint_last.pt"))
    record = json.loads(open(os.path.join(checkpoint_dir, "run.json")).read())
    assert record["settings"]["train"]["lr"] == task["train"]["lr"] and record["settings"]["source"] == "shared"

    # keeping more checkpoints, logging more often or training longer trains the same weights: resumed
    edit_yaml(configs / "toy.yaml", lambda c: c["quick"]["train"].update(keep_interval_updates=9, log_interval=1,
                                                                         max_update=60))
    train_module.train(load_task("toy", quick=True), "softmax")
    # the shared dropout changed under the same folder: refused, naming the change
    edit_yaml(configs / "toy.yaml", lambda c: c["quick"]["train"].update(dropout=0.3))
    with pytest.raises(RelaConfigError, match=r"the training settings changed since the checkpoints in .*softmax "
                                              r"were trained \(dropout: 0.1 -> 0.3\)"):
        train_module.train(load_task("toy", quick=True), "softmax")


# --------------------------------------------------------------------------- tune.sh's grid and choice

def test_the_grid_skips_what_the_config_pins_and_quick_keeps_two_points(tmp_path, monkeypatch):
    from rela_tools.pipeline.tune import grid_points

    configs = pipeline_folders(tmp_path, monkeypatch)
    edit_yaml(configs / "toy.yaml", lambda c: c["tune"]["grid"]["train"].update(warmup_updates=[10, 20]))
    edit_yaml(configs / "toy.yaml", lambda c: c.update(systems={"rela_i": {"train": {"lr": 0.003}}}))
    task = load_task("toy")
    train_points, evaluate_points = grid_points(task, "softmax")
    assert train_points == [{"lr": 0.002, "warmup_updates": 10}, {"lr": 0.002, "warmup_updates": 20},
                            {"lr": 0.004, "warmup_updates": 10}, {"lr": 0.004, "warmup_updates": 20},
                            {"lr": 0.001, "warmup_updates": 10}, {"lr": 0.001, "warmup_updates": 20}]
    assert evaluate_points == [{"lenpen": 0.6}, {"lenpen": 1.0}]
    assert grid_points(task, "rela_i")[0] == [{"warmup_updates": 10}, {"warmup_updates": 20}]  # lr pinned
    quick = grid_points(load_task("toy", quick=True), "softmax")
    assert quick == ([{"lr": 0.002, "warmup_updates": 10}, {"lr": 0.002, "warmup_updates": 20}], [{"lenpen": 0.6}])


def test_tune_chooses_by_validation_bleu_then_loss_and_never_evaluates_the_test_set(tmp_path, monkeypatch, capsys):
    from rela_tools.pipeline import evaluate as evaluate_module
    from rela_tools.pipeline import tune

    pipeline_folders(tmp_path, monkeypatch)
    task = load_task("toy")
    monkeypatch.setattr(tune, "prepare", lambda task, mirror=None: None)
    trained, splits = [], []
    bleu = {("0.002", 0.6): 20.0, ("0.002", 1.0): 21.0, ("0.004", 0.6): 21.0, ("0.004", 1.0): 19.0,
            ("0.001", 0.6): 5.0, ("0.001", 1.0): 6.0}
    loss = {"0.002": 4.2, "0.004": 4.0, "0.001": 6.0}

    def fake_train(task, system, seed, setting):
        trained.append(task.run_name(system, seed, setting))
        folder = task.checkpoint_dir(system, seed, setting)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "train.log"), "w") as f:
            f.write(f"| valid on 'valid' subset | loss 9.0 | nll_loss 8 | num_updates 200\n"
                    f"| valid on 'valid' subset | loss {loss[format(setting.train['lr'], 'g')]} | nll_loss 3 | "
                    f"ppl 8 | num_updates 400 | best_loss 4\n")
        return True

    def fake_evaluate(task, system, seed, setting, force=False, split="test"):
        splits.append(split)
        return {"sacrebleu": {"score": bleu[(format(setting.train["lr"], "g"), setting.evaluate["lenpen"])]}}

    monkeypatch.setattr(tune, "train_if_needed", fake_train)
    monkeypatch.setattr(tune, "heads_off_if_needed", lambda task, system, seed, setting, force: 0.25)
    monkeypatch.setattr(tune, "evaluate_if_needed", fake_evaluate)
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: pytest.fail("tune evaluated outside the grid"))
    report = tune.tune(task, ["rela_g"])
    assert trained == ["rela_g", "rela_g@lr=0.004", "rela_g@lr=0.001"] and set(splits) == {"valid"}
    chosen = report["systems"]["rela_g"]["chosen"]
    assert chosen == {"train": {"lr": 0.004}, "evaluate": {"lenpen": 0.6}}  # 21.0 twice: the lower loss wins
    points = report["systems"]["rela_g"]["points"]
    assert [p["valid_loss"]["mean"] for p in points[:2]] == [4.2, 4.2]  # the last update's validation loss
    table = (tmp_path / "results" / "toy" / "tune" / "tune.md").read_text()
    assert "| **ReLA-g** | **0.004** | **0.6** | **1** | **21.0** | **4.000** | **25** |" in table, table
    assert table in capsys.readouterr().out
    # compare, train and evaluate now run ReLA-g at the choice; a second tune keeps the first system's choice
    assert load_task("toy").setting("rela_g").describe() == "lr 0.004"
    tune.tune(task, ["softmax"])
    tuned = json.loads((tmp_path / "results" / "toy" / "tune" / "tuned.json").read_text())
    assert set(tuned["systems"]) == {"rela_g", "softmax"} and tuned["systems"]["rela_g"]["valid_bleu"] == 21.0


TUNER = """
import sys, types
from rela_tools.pipeline.tune import write_tuned
task = types.SimpleNamespace(tune_dir=sys.argv[1], name="multi30k_de_en", quick=False, _tuned=None)
for i in range(40):
    point = {"chosen": True, "valid_bleu": {"mean": 30.0}}
    write_tuned(task, {"seeds": [1], "date": "today",
                       "systems": {f"{sys.argv[2]}{i}": {"chosen": {"train": {}, "evaluate": {}}, "points": [point]}}})
"""


def test_two_tuning_lanes_finishing_together_both_keep_their_choice(tmp_path):
    # tuned.json is read, merged and written by every tune.sh: two at once lost one of the merges
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lanes = [subprocess.Popen([sys.executable, "-c", TUNER, str(tmp_path), lane], cwd=repo, stderr=subprocess.PIPE,
                              text=True) for lane in ("a", "b")]
    errors = [lane.communicate()[1] for lane in lanes]
    assert [lane.returncode for lane in lanes] == [0, 0], errors
    with open(tmp_path / "tuned.json", encoding="utf-8") as f:
        assert sorted(json.load(f)["systems"]) == sorted(f"{lane}{i}" for lane in "ab" for i in range(40))


def test_heads_off_counts_heads_null_for_more_than_half_their_queries():
    from rela_tools.pipeline.tune import heads_off

    def layer(*rates):
        return {"heads": [{"null_rate": rate} for rate in rates]}

    summary = {"types": {"encoder": {"layers": [layer(0.0, 0.51), layer(0.5, 0.9)]},
                         "cross": {"layers": [layer(None, 0.2)]}}}  # None: a head that saw no query
    assert heads_off(summary) == 0.4  # 2 of the 5 heads with a rate (a summary without near-null rates)


def test_heads_off_counts_a_soft_switch_off_as_an_exact_one():
    """Sigmoid's and softmax_null's rows are never exactly 0: a head is off where its rows hold almost no weight
    (near-null, which counts ReLA's exact nulls too) for more than half its queries."""
    from rela_tools.pipeline.tune import heads_off

    def head(null_rate, near_null_rate):
        return {"null_rate": null_rate, "near_null_rate": near_null_rate}

    summary = {"types": {"encoder": {"layers": [{"heads": [head(0.0, 0.99), head(0.0, 0.3)]}]},  # softmax_null
                         "cross": {"layers": [{"heads": [head(0.6, 0.6), head(0.0, None)]}]}}}  # ReLA; no query
    assert heads_off(summary) == 0.6667  # 2 of the 3 heads with a rate, to 4 digits


def test_tune_and_compare_check_that_they_can_plot_before_training_anything(tmp_path, monkeypatch):
    import importlib.util

    from rela_tools.pipeline import compare, tune

    pipeline_folders(tmp_path, monkeypatch)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else find_spec(name, *a))
    monkeypatch.setattr(compare, "prepare", lambda *a, **k: pytest.fail("prepared before the check"))
    monkeypatch.setattr(tune, "prepare", lambda *a, **k: pytest.fail("prepared before the check"))
    for run in (lambda: compare.compare(load_task("toy"), ["rela_g"]), lambda: tune.tune(load_task("toy"), ["rela_g"])):
        with pytest.raises(MissingDependencyError, match=r"pip install 'rela-fairseq\[analysis\]'"):
            run()


# --------------------------------------------------------------------------- learning curves and significance

def test_valid_losses_are_read_from_fairseqs_own_valid_lines():
    from rela_tools.pipeline.curves import valid_losses

    log = ("2026-11-30 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.569 | nll_loss 8.044 | ppl 263.88 "
           "| wps 13575.5 | wpb 1287.8 | bsz 84 | num_updates 100\n"
           "2026-11-30 | INFO | train_inner | epoch 001:    150 / 253 loss=8.1, nll_loss=7.9, num_updates=150\n"
           "... | valid on 'valid' subset | loss 6.73 | nll_loss 5.9 | ppl 59.3 | num_updates 200 | best_loss 6.73\n"
           "... | valid on 'valid' subset | loss 6.70 | nll_loss 5.9 | ppl 59.3 | num_updates 200 | best_loss 6.70\n")
    assert valid_losses(log) == {100: 8.569, 200: 6.70}  # a resumed run's repeated validation: the last counts


def test_the_paired_bootstrap_tells_a_real_difference_from_resampling_noise():
    import random

    from rela_tools.pipeline.significance import compare_to_reference, mark, paired_bootstrap

    rng = random.Random(1)
    words = [f"w{i}" for i in range(50)]
    refs = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    good = list(refs)
    noisy = [" ".join(w if rng.random() < 0.7 else "x" for w in r.split()) for r in refs]
    same = paired_bootstrap(good, good, refs)
    assert same["p_value"] == 1.0 and same["reference_bleu"] == same["system_bleu"] == 100.0
    close = paired_bootstrap(noisy, noisy[:-2] + good[-2:], refs)  # two sentences of 200 better: within noise
    assert 0.05 < close["p_value"] < 1 and close["system_bleu"] > close["reference_bleu"]
    worse = paired_bootstrap(good, noisy, refs)
    assert worse["p_value"] < 0.01 and worse["system_bleu"] < worse["reference_bleu"]
    tests = compare_to_reference({"softmax": {1: good, 2: good}, "rela_g": {1: noisy, 2: good}}, refs, "softmax")
    assert set(tests["rela_g"]["per_seed"]) == {1, 2} and tests["rela_g"]["pooled"]["seeds"] == [1, 2]
    assert tests["rela_g"]["per_seed"][2]["p_value"] > 0.5 and mark(tests["rela_g"]) == " †"
    one_seed = compare_to_reference({"softmax": {1: good}, "rela_g": {1: good}}, refs, "softmax")
    assert one_seed["rela_g"]["pooled"] is None and mark(one_seed["rela_g"]) == ""
    with pytest.raises(ValueError, match="not of the same test set"):
        paired_bootstrap(good, noisy[:-1], refs)


def test_the_results_table_keeps_runs_of_other_settings_apart():
    from rela_tools.pipeline.tables import results_table

    def result(score, seed, overrides=None):
        return {"task": "toy", "system": "rela_g", "seed": seed, "test_set": "local", "langpair": "src-tgt",
                "sacrebleu": {"score": score, "signature": "nrefs:1"},
                **({"setting": {"overrides": overrides}} if overrides else {})}

    table = results_table([result(10.0, 1), result(20.0, 1, {"train": {"lr": 0.001}, "evaluate": {"lenpen": 1.0}}),
                            result(22.0, 2, {"train": {"lr": 0.001}, "evaluate": {"lenpen": 1.0}})], paper={})
    rows = [line for line in table.splitlines() if line.startswith("| ReLA-g")]
    assert rows == ["| ReLA-g | 10.0 |", "| ReLA-g (lr 0.001, lenpen 1) | 21.0 ± 1.4 (2 seeds) |"], rows


def test_set_on_the_command_line_overrides_every_system_into_folders_of_their_own(tmp_path, monkeypatch):
    from rela_tools.pipeline.__main__ import fairseq_extra_args, parse_args
    from rela_tools.pipeline.commands import train_command
    from rela_tools.pipeline.config import parse_set_option

    pipeline_folders(tmp_path, monkeypatch)
    args = parse_args(["train", "toy", "rela_g", "--lr", "1e-3", "--set", "train.max_update=60",
                       "--set=evaluate.lenpen=1.0"])
    assert args.set == ["train.max_update=60", "evaluate.lenpen=1.0"] and fairseq_extra_args(args.fairseq_args) == [
        "--lr", "1e-3"]
    assert parse_args(["compare", "toy", "--set", "train.max_update=3000", "softmax"]).set == ["train.max_update=3000"]
    task = load_task("toy")
    for text in args.set:
        section, key, value = parse_set_option(text)
        task.command_line[section][key] = value
    setting = task.setting("rela_g")
    assert (setting.tag, setting.source, setting.evaluate["lenpen"]) == ("max_update=60", "--set", 1.0)
    assert task.run_name("softmax", 2) == "softmax@max_update=60-seed2"
    # the authors' zero q/k/v biases: a training setting of its own, in the run's name and on fairseq-train's line
    task.command_line["train"]["attn_qkv_bias_init"] = parse_set_option("train.attn_qkv_bias_init=zero")[2]
    assert task.run_name("rela_g") == "rela_g@max_update=60,attn_qkv_bias_init=zero"
    command, _ = train_command(task, "rela_g")
    assert command[command.index("--attn-qkv-bias-init") + 1] == "zero"
    # a comparison at other settings writes its tables, plots and analyses into a folder of its own
    from rela_tools.pipeline.compare import compare_dir

    del task.command_line["train"]["attn_qkv_bias_init"]
    assert os.path.basename(compare_dir(task)) == "compare@max_update=60,lenpen=1"
    task.use_tuned = False
    assert os.path.basename(compare_dir(task)) == "compare@shared,max_update=60,lenpen=1"
    task.command_line = {"train": {}, "evaluate": {}}
    assert os.path.basename(compare_dir(task)) == "compare@shared"
    task.use_tuned = True
    assert os.path.basename(compare_dir(task)) == "compare"
    for bad, message in (("max_update=5", "give SECTION.KEY=VALUE"),
                         ("train.max_updates=5", "unknown key 'max_updates'"),
                         ("train.max_update=many", r"train.max_update = 'many' should be int"),
                         ("train.seed=2", "unknown key 'seed'"),
                         ("train.attn_qkv_bias_init=ones", "'ones' is not one of uniform, zero")):
        with pytest.raises(RelaConfigError, match=message):
            parse_set_option(bad)
