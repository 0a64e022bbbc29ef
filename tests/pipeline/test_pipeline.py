"""The reproduction scripts, offline: the toy pipeline end to end, the WMT download path against a local HTTP server
serving archives in the real formats, resuming after a kill, multi-process training, bad arguments."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tool_server
from archive_server import real_config, serve_config, write_local_configs
from helpers import REPO, SCRIPTS, hold_lock, imported_modules, run_script, script_command, script_env

# --------------------------------------------------------------------------- the toy task end to end

@pytest.fixture(scope="module")
def quick_root(tmp_path_factory):
    return tmp_path_factory.mktemp("quick")


def test_reproduce_toy_writes_a_json_result_with_a_sacrebleu_signature(quick_root):
    env = script_env(quick_root, QUICK=1)
    proc = run_script("reproduce.sh", "toy", "rela_g", env=env)
    result_path = quick_root / "results" / "toy-quick" / "rela_g.json"
    result = json.loads(result_path.read_text())
    assert result["sentences"] == 50 and result["quick"] is True
    assert result["sacrebleu"]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert "BLEU|nrefs:1" in proc.stdout and "chrF2|" in proc.stdout
    hyps = (quick_root / "results" / "toy-quick" / "rela_g.hyp").read_text().splitlines()
    assert len(hyps) == 50 and "\u2581" not in "".join(hyps)  # detokenised
    if os.environ.get("RELA_TESTS_NEW_INTERPRETERS") != "1":  # the suite forked the scripts' fairseq tools
        forked = [c["argv"] for c in tool_server.server().client_calls() if c["forked"]]
        assert any(a[2:3] == ["fairseq-train"] and str(quick_root) in " ".join(a) for a in forked), forked
    # a second run finds every step done
    again = run_script("prepare.sh", "toy", env=env)
    assert "[generate] already done" in again.stderr and "[binarize] already done" in again.stderr


def test_two_pipelines_preparing_one_task_at_once_prepare_it_once(tmp_path):
    # two tuning lanes started together: the second waits for the first, then finds every step done
    env = script_env(tmp_path)
    procs = [subprocess.Popen(script_command("prepare.sh", "toy"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    ran = [log for log in logs if "[generate] ...\n" in log]
    assert len(ran) == 1, logs
    assert all("[binarize] already done" in log for log in logs if log not in ran), logs
    assert not [name for name in os.listdir(tmp_path / "data" / "toy") if name.endswith(".tmp")]


def run_side_by_side(tmp_path, script, *args, lanes=2):
    """``script`` started ``lanes`` times at once on one task, one thread each; returns their (stdout, stderr)."""
    env = script_env(tmp_path, QUICK=1, OMP_NUM_THREADS=1)
    procs = [subprocess.Popen(script_command(script, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(lanes)]
    outputs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0] * lanes, [err[-3000:] for _, err in outputs]
    return outputs


def fairseq_train_starts(checkpoints):
    """{run folder: how many times fairseq-train was started in it} (train.log's "# date: command" lines)."""
    return {log.parent.name: sum(line.startswith("# ") and " fairseq-train " in line
                                 for line in log.read_text().splitlines())
            for log in checkpoints.rglob("train.log")}


@pytest.mark.one_python
def test_the_same_tune_started_twice_shares_the_runs_and_trains_none_twice(tmp_path):
    # two lanes of one tune.sh (a laptop's two cores): each takes the runs the other is not on
    outputs = run_side_by_side(tmp_path, "tune.sh", "toy", "softmax", "rela_g")
    starts = fairseq_train_starts(tmp_path / "checkpoints")
    assert len(starts) == 4 and set(starts.values()) == {1}, starts  # QUICK: two grid points a system
    trained_by = [len(re.findall(r"running: .*fairseq-train ", err)) for _, err in outputs]
    assert sorted(trained_by) != [0, 4] and sum(trained_by) == 4, trained_by
    assert any("coming back to it last" in err for _, err in outputs)
    tables = [out[out.index("| system |"):out.index("written to")] for out, _ in outputs]
    assert tables[0] == tables[1]  # the lane that finished last waited for the other's runs, then chose alike
    tuned = json.loads((tmp_path / "results" / "toy-quick" / "tune" / "tuned.json").read_text())
    assert sorted(tuned["systems"]) == ["rela_g", "softmax"]


@pytest.mark.one_python
def test_the_same_compare_started_twice_shares_the_runs_and_times_them_once(tmp_path):
    outputs = run_side_by_side(tmp_path, "compare.sh", "toy", "softmax", "rela_g")
    starts = fairseq_train_starts(tmp_path / "checkpoints")
    assert len(starts) == 2 and set(starts.values()) == {1}, starts
    trained_by = [len(re.findall(r"running: .*fairseq-train ", err)) for _, err in outputs]
    assert trained_by == [1, 1], trained_by
    # one of them analysed and timed the runs, alone; the other waited for it, then reused its measurement
    assert sum("speed measured already, reusing" in err for _, err in outputs) == 1
    tables = [out[out.index("| system |"):out.index("written to")] for out, _ in outputs]
    assert tables[0] == tables[1]


@pytest.mark.one_python
def test_train_and_evaluate_wait_for_another_process_working_on_their_run(tmp_path):
    import threading

    env = script_env(tmp_path, QUICK=1, OMP_NUM_THREADS=1)
    run_script("prepare.sh", "toy", env=env)
    run_dir = tmp_path / "checkpoints" / "toy-quick" / "softmax"
    for script in ("train.sh", "evaluate.sh"):
        holder = hold_lock(run_dir / "run.lock")
        try:
            waiter = subprocess.Popen(script_command(script, "toy", "softmax"), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
            lines: list[str] = []
            reader = threading.Thread(target=lines.extend, args=(waiter.stderr,), daemon=True)
            reader.start()
            deadline = time.time() + 300
            while not any("is working on this run; waiting for it" in line for line in lines):
                assert waiter.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
                time.sleep(0.2)
            time.sleep(2)
            assert waiter.poll() is None  # still waiting: nothing trained or decoded meanwhile
            if script == "train.sh":
                assert not (run_dir / "train.log").exists()
            else:
                assert not (tmp_path / "results" / "toy-quick" / "softmax.json").exists()
        finally:
            holder.kill()
            holder.wait()
        waiter.wait(timeout=600)
        reader.join()
        assert waiter.returncode == 0, "".join(lines)[-3000:]
        assert str(holder.pid) in next(line for line in lines if "waiting for it" in line)
    assert (tmp_path / "results" / "toy-quick" / "softmax.json").exists()


@pytest.mark.one_python  # compare's own logic: fairseq's version changes nothing in it (test_compare.py's marker)
def test_main_job_is_the_comparison_multi30k_runs_with_the_toy_tasks_aer(quick_root):
    with open(os.path.join(SCRIPTS, "toy_demo.sh"), encoding="utf-8") as f:
        assert f.read().rstrip().endswith("run_pipeline compare toy softmax rela_g")  # after setting up the env
    env = script_env(quick_root, QUICK=1)
    out = run_script("compare.sh", "toy", "softmax", "rela_g", env=env).stdout
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| system |"))
    for column in ("BLEU", "chrF", "BP", "sparsity % (enc/dec/cross)", "null rate % (enc/dec/cross)",
                   "near-null % (enc/dec/cross)",
                   "JS nats (enc/dec/cross)", "AER % (normal / shifted)"):
        assert f"| {column} |" in header, column
    rows = {line.split("|")[1].strip(): line.split("|") for line in lines if line.startswith("| ")}
    column = header.split("|").index(" sparsity % (enc/dec/cross) ")
    assert rows["softmax"][column].strip() == "0.0 / 0.0 / 0.0" and rows["ReLA-g"][column].strip() != "0.0 / 0.0 / 0.0"
    aer = rows["ReLA-g"][header.split("|").index(" AER % (normal / shifted) ")]
    assert re.fullmatch(r" \d+\.\d \(L\d (avg|h\d)\) / \d+\.\d \(L\d (avg|h\d)\) ", aer), aer
    assert "AER: alignment error rate against the gold word alignments" in out
    written = set(os.listdir(quick_root / "results" / "toy-quick" / "compare"))
    assert {"compare.md", "compare.json", "sparsity.png", "null_rate.png", "near_null_rate.png", "aer_by_layer.png",
            "learning_curves.png"} <= written
    # results.sh gathers the JSON results into the paper-style table
    table = run_script("results.sh", "--output", quick_root / "results.md", env=env).stdout
    assert "| system | toy (QUICK) |" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert re.match(r"\| softmax \| \d+\.\d \|", rows["softmax"])
    assert re.match(r"\| ReLA-g \| \d+\.\d \|", rows["ReLA-g"])
    assert "nrefs:1|case:mixed|eff:no|tok:13a" in table
    assert (quick_root / "results.md").read_text().strip() == table.strip()


def saved(log):
    return log.exists() and "Saved checkpoint" in log.read_text()


def test_train_resumes_after_being_killed(quick_root):
    env = script_env(quick_root, QUICK=1)
    run_script("prepare.sh", "toy", env=env)
    ckpt = quick_root / "checkpoints" / "toy-quick" / "entmax15"
    proc = subprocess.Popen(["bash", os.path.join(SCRIPTS, "train.sh"), "toy", "entmax15"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # fairseq copies each checkpoint to checkpoint_last.pt, which exists before the copy is done: kill after the
    # save has been logged (a kill during the copy leaves a truncated checkpoint_last.pt that fairseq cannot load)
    deadline = time.time() + 300
    while not saved(ckpt / "train.log") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be interrupted"
    assert (ckpt / "checkpoint_last.pt").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # and as if the kill had come during fairseq's copy to checkpoint_last.pt: the file cut short
    last = ckpt / "checkpoint_last.pt"
    os.truncate(last, last.stat().st_size // 2)
    resumed = run_script("train.sh", "toy", "entmax15", env=env)
    log = resumed.stdout + resumed.stderr
    assert "checkpoint_last.pt was truncated (fairseq-train was stopped while copying it): replaced by a copy of " \
           "checkpoint" in log, log[-2000:]
    assert (ckpt / "checkpoint_last.pt.truncated").exists()
    loaded = re.search(r"[Ll]oaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ (\d+) updates\)", log)
    assert loaded and 0 < int(loaded.group(1)) < 30, log[-2000:]
    assert max(int(n) for n in re.findall(r"num_updates[= ](\d+)", log)) == 30


def save_checkpoints(folder, names, truncated=()):
    """torch.save archives named ``names``, written one after the other (mtimes a second apart, in that order);
    those in ``truncated`` cut in half, as a kill during fairseq's copy leaves them."""
    import torch

    folder.mkdir(exist_ok=True)
    for second, name in enumerate(names):
        torch.save({"name": name, "weights": torch.arange(1000.0)}, folder / name)
        if name in truncated:
            os.truncate(folder / name, (folder / name).stat().st_size // 2)
        os.utime(folder / name, (1_700_000_000 + second,) * 2)


def saved_name(path):
    import torch

    return torch.load(path)["name"]


@pytest.mark.one_python
def test_a_truncated_copy_is_completed_from_the_save_it_was_copied_from(tmp_path):
    from rela_tools.pipeline.records import is_truncated, repair_interrupted_copies

    # epoch 1's checkpoints are complete; the kill came while fairseq copied checkpoint_1_20.pt to checkpoint_last.pt;
    # checkpoint_avg2.pt (evaluate's average, written later) and checkpoint_2_30.pt (written after) are no sources
    save_checkpoints(tmp_path, ["checkpoint1.pt", "checkpoint_1_20.pt", "checkpoint_best.pt", "checkpoint_last.pt",
                                "checkpoint_avg2.pt", "checkpoint_2_30.pt"], truncated={"checkpoint_last.pt"})
    assert is_truncated(tmp_path / "checkpoint_last.pt") and not is_truncated(tmp_path / "checkpoint_best.pt")
    assert repair_interrupted_copies(str(tmp_path)) == ["checkpoint_last.pt"]
    assert saved_name(tmp_path / "checkpoint_last.pt") == "checkpoint_best.pt"  # the newest save before the cut
    assert is_truncated(tmp_path / "checkpoint_last.pt.truncated")
    assert repair_interrupted_copies(str(tmp_path)) == []  # nothing left to repair

    # --no-epoch-checkpoints and no interval saves: checkpoint_best.pt is the first file of each save
    other = tmp_path / "best_first"
    save_checkpoints(other, ["checkpoint_best.pt", "checkpoint_last.pt"], truncated={"checkpoint_last.pt"})
    assert repair_interrupted_copies(str(other)) == ["checkpoint_last.pt"]
    assert saved_name(other / "checkpoint_last.pt") == "checkpoint_best.pt"

    # the copy to checkpoint_best.pt was cut: it is completed; checkpoint_last.pt (the save before) is left as it is
    other = tmp_path / "best_cut"
    save_checkpoints(other, ["checkpoint_1_10.pt", "checkpoint_last.pt", "checkpoint_1_20.pt", "checkpoint_best.pt"],
                     truncated={"checkpoint_best.pt"})
    assert repair_interrupted_copies(str(other)) == ["checkpoint_best.pt"]
    assert saved_name(other / "checkpoint_best.pt") == "checkpoint_1_20.pt"
    assert saved_name(other / "checkpoint_last.pt") == "checkpoint_last.pt"

    # --keep-best-checkpoints: the copy to checkpoint.best_loss_* was cut
    other = tmp_path / "kept_best_cut"
    save_checkpoints(other, ["checkpoint_1_20.pt", "checkpoint_best.pt", "checkpoint.best_loss_2.50.pt"],
                     truncated={"checkpoint.best_loss_2.50.pt"})
    assert repair_interrupted_copies(str(other)) == ["checkpoint.best_loss_2.50.pt"]
    assert saved_name(other / "checkpoint.best_loss_2.50.pt") == "checkpoint_best.pt"


@pytest.mark.one_python
def test_a_truncated_copy_that_cannot_be_completed_is_an_error_and_loses_nothing(tmp_path, monkeypatch):
    from rela_tools.errors import RelaFairseqError
    from rela_tools.pipeline.records import repair_interrupted_copies

    save_checkpoints(tmp_path, ["checkpoint_last.pt", "checkpoint_1_20.pt"], truncated={"checkpoint_last.pt"})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "checkpoint_last.pt").write_bytes(b"")  # killed before the copy wrote anything
    for folder in (tmp_path, tmp_path / "empty"):
        with pytest.raises(RelaFairseqError, match=f"{folder / 'checkpoint_last.pt'} is truncated .* no complete "
                                                   f"checkpoint written before it is left in {folder}"):
            repair_interrupted_copies(str(folder))
        assert (folder / "checkpoint_last.pt").exists() and not (folder / "checkpoint_last.pt.truncated").exists()
    # a disk that fills up during the repair: the cut file stays where it was, no half-written copy is left
    full = tmp_path / "full"
    save_checkpoints(full, ["checkpoint_1_20.pt", "checkpoint_last.pt"], truncated={"checkpoint_last.pt"})

    def no_space(source, target):
        open(target, "wb").write(b"PK\x03\x04")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", no_space)
    with pytest.raises(OSError, match="No space left"):
        repair_interrupted_copies(str(full))
    assert sorted(os.listdir(full)) == ["checkpoint_1_20.pt", "checkpoint_last.pt"]
    monkeypatch.undo()

    # torch's legacy (pre-zip) format is not judged: fairseq's own load reports on it
    import torch

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"old": 1}, legacy / "checkpoint_last.pt", _use_new_zipfile_serialization=False)
    assert repair_interrupted_copies(str(legacy)) == []


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.one_python
def test_evaluate_averages_the_interval_saves_as_the_authors_toolkit(tmp_path, caplog):
    """zero averages its last 5 saves, made every 5,000 steps; fairseq also saves at each epoch's end, and with
    epochs shorter than the interval the newest states of any kind would span a fraction of that window."""
    import torch

    from rela_tools.pipeline.evaluate import checkpoints_to_average

    # saves every 100 updates (3 kept), epochs of 70 updates (checkpoint6.pt ends epoch 6 at 420 updates), and an
    # epoch that ends exactly at 600 updates, where fairseq writes the epoch checkpoint only
    updates = {"checkpoint_5_300.pt": 300, "checkpoint5.pt": 350, "checkpoint_6_400.pt": 400, "checkpoint6.pt": 420,
               "checkpoint7.pt": 490, "checkpoint_8_500.pt": 500, "checkpoint8.pt": 560, "checkpoint9.pt": 600,
               "checkpoint_last.pt": 600}
    for name, n in updates.items():
        torch.save({"optimizer_history": [{"num_updates": n}], "model": {}}, tmp_path / name)

    def names(paths):
        return [os.path.basename(p) for p in paths]

    assert names(checkpoints_to_average(str(tmp_path), 3, 100)) == ["checkpoint9.pt", "checkpoint_8_500.pt",
                                                                    "checkpoint_6_400.pt"]
    # no interval: the newest states of any kind, each once
    assert names(checkpoints_to_average(str(tmp_path), 3, 0)) == ["checkpoint9.pt", "checkpoint8.pt",
                                                                  "checkpoint_8_500.pt"]
    # a run shorter than one interval: the newest of any kind, with a warning that says so
    with caplog.at_level("WARNING"):
        assert names(checkpoints_to_average(str(tmp_path), 2, 5000)) == ["checkpoint9.pt", "checkpoint8.pt"]
    assert "no checkpoint in" in caplog.text and "multiple of 5000 updates" in caplog.text


def test_resume_on_another_device_count_keeps_tokens_per_update(quick_root):
    """ReLA-i (the plugin's attention under data-parallel training), on the toy data the tests above prepared."""
    env = script_env(quick_root, QUICK=1)
    run_script("prepare.sh", "toy", env=env)
    first = run_script("train.sh", "toy", "rela_i", "--max-update", 4,
                       env=dict(env, NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    log = first.stdout + first.stderr  # two processes through torchrun, gloo on CPUs
    assert "distributed init (rank 0)" in log and "distributed init (rank 1)" in log and "torchrun" in log
    assert "batch: 2000 tokens x 1 step(s) x 2 device(s) = 4000 tokens per update" in first.stderr
    resumed = run_script("train.sh", "toy", "rela_i", "--max-update", 6, env=env)
    log = resumed.stdout + resumed.stderr
    assert "resuming on 1 device(s) (trained so far on 2): 2000 x 1 x 2 becomes 4000 x 1 x 1; tokens per update " \
           "stay at 4000" in log
    assert "Loaded checkpoint" in log and "@ 4 updates" in log
    record = json.loads((quick_root / "checkpoints" / "toy-quick" / "rela_i" / "run.json").read_text())
    batches = [h["batch"] for h in record["history"]]
    assert [b["devices"] for b in batches] == [2, 1]
    assert {b["max_tokens"] * b["update_freq"] * b["devices"] for b in batches} == {4000}


@pytest.mark.parametrize("args,message", [
    (("prepare.sh", "wmt15_xx_yy"), "unknown task 'wmt15_xx_yy'; choose one of iwslt14_de_en, multi30k_de_en, "
                                    "multi30k_en_de, multi30k_en_fr, toy, wmt14_en_de"),
    (("compare.sh", "toy", "relu"), "unknown system 'relu'; choose one of softmax, sparsemax, entmax15"),
    (("compare.sh", "toy", "--seeds", "0"), "--seeds must be at least 1, got 0"),
    (("train.sh", "toy", "relu"), "unknown system 'relu'; choose one of softmax, sparsemax, entmax15"),
    (("evaluate.sh", "toy", "rela_i"), "no checkpoints for toy/rela_i"),
    (("train.sh", "wmt14_en_de", "rela_g"), "no binarised data for wmt14_en_de"),
    (("prepare.sh",), "the following arguments are required: TASK"),
])
def test_bad_arguments_exit_nonzero_naming_them(tmp_path, args, message):
    proc = run_script(*args, env=script_env(tmp_path), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()  # no run folder made on the way (its lock, its record)


@pytest.mark.one_python
def test_every_script_has_help(tmp_path):
    names = ("prepare.sh", "train.sh", "evaluate.sh", "reproduce.sh", "results.sh", "compare.sh", "setup_env.sh",
             "test.sh", "toy_demo.sh")
    procs = {name: subprocess.Popen(script_command(name, "--help"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=script_env(tmp_path)) for name in names}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip(), f"{name}: {err[-1000:]}"


def test_the_pipeline_driver_imports_neither_fairseq_nor_torch_to_dispatch(tmp_path):
    """The scripts' driver (python -m rela_tools.pipeline) runs fairseq's tools as processes of their own: a
    mistyped task or --help must not wait for fairseq's imports (about 6 s); the plugin registers as usual elsewhere."""
    driver = [sys.executable, "-X", "importtime", "-m", "rela_tools.pipeline"]
    for args, code, says in ((["--help"], 0, "usage: python -m rela_tools.pipeline"),
                             (["prepare", "wmt15_xx_yy"], 1, "unknown task 'wmt15_xx_yy'"),
                             (["results", "--output", str(tmp_path / "results.md")], 1, "no results yet")):
        proc = subprocess.run([*driver, *args], capture_output=True, text=True, env=script_env(tmp_path), cwd=REPO)
        assert proc.returncode == code and says in proc.stdout + proc.stderr, (args, proc.stderr[-2000:])
        imported = imported_modules(proc.stderr)
        assert "rela_tools.pipeline" in imported and not {"fairseq", "torch"} & imported, args
    plugin = subprocess.run([sys.executable, "-c", "import rela_fairseq, fairseq.models as m; "
                             "print('transformer_rela' in m.ARCH_MODEL_REGISTRY)"], capture_output=True, text=True)
    assert plugin.stdout.strip() == "True", plugin.stderr[-2000:]


@pytest.mark.one_python
def test_scripts_help_works_before_the_environment_exists(tmp_path):
    """A fresh clone: no environment, no fairseq; a plain python3 prints the pipeline scripts' help."""
    import shutil

    clone = tmp_path / "clone"
    for folder in ("scripts", "rela_fairseq", "rela_tools", "configs"):
        shutil.copytree(os.path.join(REPO, folder), clone / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    python = shutil.which("python3", path=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                                          if not p.startswith(os.path.dirname(sys.executable))))
    probe = subprocess.run([python, "-c", "import fairseq"], capture_output=True)
    assert probe.returncode != 0, f"{python} has fairseq: this test needs a Python without it"
    env = {k: v for k, v in os.environ.items() if k not in ("RELA_PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = os.path.dirname(python) + os.pathsep + "/usr/bin:/bin"
    for name in ("prepare.sh", "train.sh", "evaluate.sh", "reproduce.sh", "results.sh", "compare.sh"):
        proc = subprocess.run(["bash", str(clone / "scripts" / name), "--help"], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, f"{name}: {proc.stderr[-2000:]}"


# --------------------------------------------------------------------------- downloads, against a local server

def local_config(task, server, config_dir, archives_dir):
    """The real task config, its download addresses pointed at the local server, which serves archives built from
    the manifest of the real ones; every member path and format stays as in the real file."""
    config = real_config(task)
    files = serve_config(config, server, str(archives_dir))
    write_local_configs(task, config, config_dir)
    return config, files


@pytest.mark.one_python
def test_prepare_wmt_task_from_a_local_server(server, tmp_path):
    """WMT14 En-Fr: tgz archives, a plain tar with gzipped text inside, SGML dev and test sets."""
    config_dir = tmp_path / "configs"
    local_config("wmt14_en_fr", server, config_dir, server.folder)
    env = script_env(tmp_path, QUICK=1, RELA_CONFIG_DIR=config_dir)
    run_script("prepare.sh", "wmt14_en_fr", env=env)
    data = tmp_path / "data" / "wmt14_en_fr-quick"
    assert (data / "bin" / "dict.fr.txt").exists() and (data / "bin" / "spm.model").exists()
    train_en = (data / "raw" / "train.en").read_text().splitlines()
    assert len(train_en) == 5 * 60 and "en sentence 0 of giga-fren.release2.fixed.en.gz" in train_en
    # the reference exactly as sacrebleu reads SGML: the <seg> text, whitespace collapsed
    assert (data / "raw" / "test.ref").read_text().splitlines()[:2] == ["fr test sentence 0", "fr test sentence 1"]
    assert not list((data / "downloads").glob("*.part"))
    # a second run downloads nothing and redoes nothing
    before = len(server.requests)
    again = run_script("prepare.sh", "wmt14_en_fr", env=env)
    assert len(server.requests) == before and "[download] already done" in again.stderr


@pytest.mark.one_python
@pytest.mark.parametrize("task", ["wmt16_ro_en", "wmt18_en_fi", "iwslt14_de_en"])
def test_other_wmt_layouts_download_and_extract_from_a_local_server(server, tmp_path, monkeypatch, task):
    """Ro-En (the WMT16 Europarl v8 archive, the SETimes2 zip), En-Fi (' ||| ' Wiki Headlines columns) and IWSLT14
    (train.tags, XML) extract with the member paths of the real configs (download and extract, in process)."""
    from rela_tools.pipeline.config import load_task
    from rela_tools.pipeline.download import fetch
    from rela_tools.pipeline.prepare import _extract

    config_dir = tmp_path / "configs"
    config, _ = local_config(task, server, config_dir, server.folder)
    monkeypatch.setenv("RELA_CONFIG_DIR", str(config_dir))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    loaded = load_task(task, quick=True)
    for entry in loaded["data"]["downloads"].values():
        fetch(entry, loaded.path("downloads"), progress=False)
    _extract(loaded)
    src, tgt = config["src"], config["tgt"]
    train_src = (tmp_path / "data" / f"{task}-quick" / "raw" / f"train.{src}").read_text().splitlines()
    train_tgt = (tmp_path / "data" / f"{task}-quick" / "raw" / f"train.{tgt}").read_text().splitlines()
    assert len(train_src) == len(train_tgt) > 0
    for s, t in zip(train_src, train_tgt):  # every pair stays aligned, each side in its language
        assert s.split()[0] == src and t.split()[0] == tgt, (s, t)


@pytest.mark.one_python
def test_checksum_mismatch_is_a_clear_error_and_keeps_no_partial_file(server, tmp_path):
    config_dir = tmp_path / "configs"
    config, files = local_config("wmt14_en_de", server, config_dir, server.folder)
    config["data"]["downloads"]["commoncrawl"]["md5"] = "0" * 32
    write_local_configs("wmt14_en_de", config, config_dir)
    env = script_env(tmp_path, QUICK=1, RELA_CONFIG_DIR=config_dir)
    proc = run_script("prepare.sh", "wmt14_en_de", env=env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "training-parallel-commoncrawl.tgz: md5 checksum mismatch (expected 00000000000000000000000000000000, " \
           f"got {hashlib.md5(open(files['commoncrawl'], 'rb').read()).hexdigest()})" in proc.stderr
    downloads = tmp_path / "data" / "wmt14_en_de-quick" / "downloads"
    assert not (downloads / "training-parallel-commoncrawl.tgz").exists()
    assert not (downloads / "training-parallel-commoncrawl.tgz.part").exists()


@pytest.mark.one_python
def test_interrupted_download_resumes_where_it_stopped(server, tmp_path):
    config_dir = tmp_path / "configs"
    _, files = local_config("wmt14_en_de", server, config_dir, server.folder)
    name = "training-parallel-europarl-v7.tgz"
    size = os.path.getsize(files["europarl_v7"])
    server.cut[name] = 3  # every attempt of the first run drops the connection half-way
    env = script_env(tmp_path, QUICK=1, RELA_CONFIG_DIR=config_dir, RELA_DOWNLOAD_RETRY_WAIT=0)
    first = run_script("prepare.sh", "wmt14_en_de", env=env, check=False)
    assert first.returncode != 0 and "run the command again to resume" in first.stderr
    part = tmp_path / "data" / "wmt14_en_de-quick" / "downloads" / (name + ".part")
    have = os.path.getsize(part)
    assert 0 < have < size
    assert not (part.parent / name).exists(), "a partial file must never carry the final name"
    run_script("prepare.sh", "wmt14_en_de", env=env)
    ranges = [r for method, n, r in server.requests if n == name and r]
    assert f"bytes={have}-" in ranges, ranges
    data = (part.parent / name).read_bytes()
    assert data == open(files["europarl_v7"], "rb").read()


@pytest.mark.one_python
def test_mirror_folder_replaces_the_addresses(tmp_path):
    from rela_tools.pipeline.download import resolve_url

    config_dir, mirror = tmp_path / "configs", tmp_path / "mirror"
    mirror.mkdir()

    class NoServer:
        base = "http://127.0.0.1:9"  # nothing listens there

    local_config("wmt16_ro_en", NoServer, config_dir, str(mirror))
    env = script_env(tmp_path, QUICK=1, RELA_CONFIG_DIR=config_dir, RELA_DOWNLOAD_MIRROR=mirror)
    run_script("prepare.sh", "wmt16_ro_en", env=env)
    assert (tmp_path / "data" / "wmt16_ro_en-quick" / "bin" / "dict.en.txt").exists()
    assert resolve_url("https://x.org/a/b.tgz", "http://m.example/base/") == "http://m.example/base/b.tgz"
