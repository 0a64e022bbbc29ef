"""Kill it anywhere, lose nothing: the QUICK toy pipeline (scripts/reproduce.sh toy SYSTEM: prepare, train, evaluate)
killed with SIGKILL of its whole process group at moments drawn with a fixed seed (in prepare, during a training step,
inside fairseq's copy of a save to checkpoint_last.pt, right after a save, while averaging, while decoding), then run
to the end, equals an uninterrupted run: the same number of updates, the same checkpoint files with bit-identical
model weights, the same hypotheses.

Run as a script, this file is the wrapper the campaign puts before fairseq-train (RELA_TOOL_PREFIX) for the kill
inside the copy: ``python test_kill_resume.py PYTHON fairseq_tool.py fairseq-train ...`` runs the tool in this
process and kills it half-way through the copy that KILL_INSIDE_COPY names.
"""

import contextlib
import glob
import os
import random
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM = "rela_g"  # the plugin's own attention (fused or eager kernels, as RELA_FAIRSEQ_KERNEL says) and dropout
MAX_UPDATE = 30  # configs/toy.yaml, quick
KILL_INSIDE_COPY = "RELA_TEST_KILL_INSIDE_COPY"  # the wrapper's setting: the name of the copy to cut (its first one)
MOMENTS_SEED = 25
# each kill: where it lands, what must have happened in that run first, and the range of the random delay after it
KILLS = [
    ("prepare, binarising", "binarize", (0.0, 1.0)),
    ("a training step", "save", (0.5, 4.0)),
    ("fairseq's copy to checkpoint_last.pt", "copy", None),
    ("right after a save", "save", (0.0, 0.5)),
    ("averaging", "averaging", (0.0, 0.3)),
    ("decoding", "generate", (0.5, 3.0)),
]


# --------------------------------------------------------------------------- the wrapper (run as a script)

def kill_inside_copy(argv: list[str]) -> None:
    """Run ``argv`` (``PYTHON fairseq_tool.py TOOL ARGS...``) in this process, with shutil.copyfile (what fairseq's
    PathManager.copy calls) writing half of the first copy named by KILL_INSIDE_COPY and then killing this process."""
    target = os.environ[KILL_INSIDE_COPY]
    copyfile = shutil.copyfile

    def cut_copy(source, destination, *args, **kwargs):
        if os.path.basename(destination) == target:
            with open(source, "rb") as src, open(destination, "wb") as dst:
                dst.write(src.read(os.path.getsize(source) // 2))
            os.kill(os.getpid(), signal.SIGKILL)
        return copyfile(source, destination, *args, **kwargs)

    shutil.copyfile = cut_copy
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]  # this folder shadows nothing
    sys.argv = argv[1:]
    runpy.run_path(argv[1], run_name="__main__")


if __name__ == "__main__":
    kill_inside_copy(sys.argv[1:])
    sys.exit(0)

import pytest  # noqa: E402  (the wrapper above needs none of the tests' imports)

# --------------------------------------------------------------------------- the campaign

def pipeline_env(root, **extra) -> dict:
    env = dict(os.environ, RELA_PYTHON=sys.executable, QUICK="1", DATA_ROOT=str(root / "data"),
               CHECKPOINT_ROOT=str(root / "checkpoints"), RESULTS_ROOT=str(root / "results"), PYTHONUNBUFFERED="1")
    env.pop("RELA_DOWNLOAD_MIRROR", None)
    env.update(extra)
    return env


def reproduce_command() -> list[str]:
    return ["bash", os.path.join(REPO, "scripts", "reproduce.sh"), "toy", SYSTEM]


def checkpoint_dir(root) -> str:
    found = glob.glob(str(root / "checkpoints" / "toy-quick" / "**" / "run.json"), recursive=True)
    assert len(found) == 1, f"expected one run under {root / 'checkpoints'}, found {found}"
    return os.path.dirname(found[0])


def read_text(path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def tool_children() -> list[int]:
    """The processes the suite's tool server (tool_server.py) forked and has not reaped: a killed caller's tool lives
    on until the server notices the caller's end and kills it."""
    if not os.environ.get("RELA_TESTS_TOOL_SOCKET"):
        return []
    import tool_server

    server = tool_server.server().process.pid
    children = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = read_text(stat).rsplit(")", 1)[1].split()
        except IndexError:
            continue
        if fields and int(fields[1]) == server:
            children.append(int(stat.split("/")[2]))
    return children


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group and wait until nothing it started is left (forked tools included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.time() + 60
    while tool_children() and time.time() < deadline:
        time.sleep(0.05)
    assert not tool_children(), "the tool server's forked tools outlived the kill of their caller"


class Run:
    """One start of reproduce.sh in its own process group, its output in a file."""

    def __init__(self, root, number: int, env: dict):
        self.output = root / f"run{number}.log"
        self.saves_before = self.saves()
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen(reproduce_command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def saves(self) -> int:
        return sum(read_text(log).count("Saved checkpoint")
                   for log in glob.glob(str(self.output.parent / "checkpoints" / "**" / "train.log"), recursive=True))

    def happened(self, event: str) -> bool:
        if event == "copy":  # the wrapper kills fairseq-train inside the copy: the run ends by itself
            return False
        if event == "save":
            return self.saves() > self.saves_before
        text = read_text(self.output)
        return {"binarize": "[binarize] ...", "averaging": "averaging checkpoint",
                "generate": "fairseq-generate"}[event] in text

    def text(self) -> str:
        return read_text(self.output)


def kill_campaign(root, env: dict) -> list[str]:
    """Start reproduce.sh again after each kill of KILLS, then once to the end; the outputs of all runs."""
    from rela_tools.pipeline.records import is_truncated

    moments = random.Random(MOMENTS_SEED)
    outputs = []
    root.mkdir(parents=True, exist_ok=True)
    for number, (where, event, delay) in enumerate(KILLS, 1):
        run_env = dict(env)
        if event == "copy":
            wrapper = [sys.executable, os.path.abspath(__file__)]
            run_env["RELA_TOOL_PREFIX"] = shlex.join(shlex.split(env.get("RELA_TOOL_PREFIX", "")) + wrapper)
            run_env[KILL_INSIDE_COPY] = "checkpoint_last.pt"
        run = Run(root, number, run_env)
        pause = moments.uniform(*delay) if delay else 0.0
        deadline = time.time() + 600
        while run.proc.poll() is None and not run.happened(event) and time.time() < deadline:
            time.sleep(0.02)
        if event != "copy":  # the wrapper kills fairseq-train itself, inside the copy
            time.sleep(pause)
            assert run.proc.poll() is None, f"run {number} ended before its kill ({where}):\n{run.text()[-3000:]}"
        else:
            run.proc.wait(timeout=600)
            last = os.path.join(checkpoint_dir(root), "checkpoint_last.pt")
            assert is_truncated(last), f"run {number} was not killed inside the copy:\n{run.text()[-3000:]}"
        kill_group(run.proc)
        outputs.append(run.text())
    last = Run(root, len(KILLS) + 1, env)
    last.proc.wait(timeout=900)
    outputs.append(last.text())
    assert last.proc.returncode == 0, f"the run after the kills failed:\n{last.text()[-4000:]}"
    return outputs


def uninterrupted(root, env: dict) -> None:
    proc = subprocess.run(reproduce_command(), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the uninterrupted run failed:\n{proc.stderr[-4000:]}"


def checkpoints(folder: str) -> dict:
    """{name: state} of the checkpoint files in ``folder`` (read with the plugin's allow-list)."""
    import torch

    from rela_fairseq import compat

    compat.allow_fairseq_checkpoints()
    return {name: torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            for name in sorted(os.listdir(folder)) if name.endswith(".pt")}


def updates(state: dict) -> int:
    return int(state["optimizer_history"][-1]["num_updates"])


def differing_weights(a: dict, b: dict) -> list[str]:
    """The keys of two model state dicts whose values are not bit-identical."""
    import torch

    def same(x, y) -> bool:
        if torch.is_tensor(x) or torch.is_tensor(y):
            return torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
        return x == y

    # fairseq's sinusoidal positions keep an uninitialised one-element buffer only to follow the model's device and
    # dtype (_float_tensor): whatever the memory held, in two uninterrupted runs too
    return sorted(set(a) ^ set(b)) + [key for key in a if key in b and not key.endswith("._float_tensor")
                                      and not same(a[key], b[key])]


def hypotheses(root) -> dict:
    return {os.path.relpath(path, root / "results"): read_text(path)
            for path in glob.glob(str(root / "results" / "**" / "*.hyp"), recursive=True)}


def test_a_pipeline_killed_anywhere_and_completed_equals_an_uninterrupted_run(tmp_path):
    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    uninterrupted(reference, pipeline_env(reference))
    outputs = kill_campaign(killed, pipeline_env(killed))
    everything = "\n".join(outputs)
    # the kill inside the copy left checkpoint_last.pt cut short, and a re-run completed it
    assert "checkpoint_last.pt was truncated (fairseq-train was stopped while copying it)" in everything

    expected, got = checkpoints(checkpoint_dir(reference)), checkpoints(checkpoint_dir(killed))
    assert updates(got["checkpoint_last.pt"]) == updates(expected["checkpoint_last.pt"]) == MAX_UPDATE
    assert sorted(got) == sorted(expected)
    for name, state in expected.items():
        assert updates(got[name]) == updates(state), name
        assert not differing_weights(state["model"], got[name]["model"]), f"{name}: other weights"
    assert hypotheses(killed) == hypotheses(reference) != {}


# --------------------------------------------------------------------------- the parts, fast

def toy_pair_dataset(sentences: int = 300):
    """A LanguagePairDataset of random sentences with many equal lengths (ties the batch order has to break)."""
    import torch
    from fairseq.data import Dictionary, LanguagePairDataset

    dictionary = Dictionary()
    for i in range(20):
        dictionary.add_symbol(f"w{i}")
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (sentences,), generator=generator).tolist()
    src = [torch.randint(4, len(dictionary), (n,), generator=generator) for n in lengths]
    return LanguagePairDataset(src, lengths, dictionary, src, lengths, dictionary)


def sample_ids(iterator) -> list[list[int]]:
    return [sample["id"].tolist() for sample in iterator]


def as_lists(batches) -> list[list[int]]:
    return [list(map(int, batch)) for batch in batches]


def test_a_resumed_training_iterator_has_the_batches_of_an_uninterrupted_one():
    """fairseq-fixed builds the batches under seed + the epoch its training iterator is created at; the plugin makes
    a resumed run's iterator (created at a later epoch) build those an uninterrupted run built at epoch 1."""
    from fairseq.tasks import FairseqTask

    import rela_fairseq  # noqa: F401  installs the wrapper (resume.py)

    dataset = toy_pair_dataset()
    options = {"max_tokens": 200, "seed": 1}
    uninterrupted = FairseqTask(None).get_batch_iterator(dataset, epoch=1, **options)
    for _ in range(3):  # epochs 1-3 on the one iterator an uninterrupted run keeps
        sample_ids(uninterrupted.next_epoch_itr(shuffle=True))
    resumed = FairseqTask(None).get_batch_iterator(dataset, epoch=4, **options)
    assert resumed.epoch == uninterrupted.next_epoch_idx == 4
    assert as_lists(resumed.frozen_batches) == as_lists(uninterrupted.frozen_batches)
    assert len(resumed.frozen_batches) > 5
    assert sample_ids(resumed.next_epoch_itr(shuffle=True)) == sample_ids(uninterrupted.next_epoch_itr(shuffle=True))
    # an iterator that fairseq builds anew at every epoch, in an uninterrupted run too, stays fairseq's own
    own = FairseqTask.get_batch_iterator.__wrapped__
    rebuilt = FairseqTask(None).get_batch_iterator(dataset, epoch=4, disable_iterator_cache=True, **options)
    assert as_lists(rebuilt.frozen_batches) == as_lists(
        own(FairseqTask(None), dataset, epoch=4, disable_iterator_cache=True, **options).frozen_batches)


def save_states(folder, updates_by_name: dict) -> None:
    import torch

    folder.mkdir(exist_ok=True)
    for name, updates in updates_by_name.items():
        torch.save({"optimizer_history": [{"num_updates": updates}], "model": {}}, folder / name)


@pytest.mark.one_python
def test_a_finished_run_is_not_trained_again_and_its_cut_removals_are_completed(tmp_path):
    from rela_tools.pipeline.commands import fairseq_option
    from rela_tools.pipeline.records import training_complete

    args = ["DATA", "--max-update", "30", "--keep-last-epochs", "2", "--keep-interval-updates", "2",
            "--max-update=40"]
    assert fairseq_option(args, "--max-update") == "40" and fairseq_option(args, "--save-dir") is None
    # killed after the last save's copies, before fairseq's removals: one epoch and one interval save too many
    saves = {"checkpoint1.pt": 10, "checkpoint2.pt": 20, "checkpoint3.pt": 30, "checkpoint_1_5.pt": 5,
             "checkpoint_2_15.pt": 15, "checkpoint_3_25.pt": 25, "checkpoint_best.pt": 30, "checkpoint_last.pt": 30}
    save_states(tmp_path, saves)
    assert not training_complete(str(tmp_path), args)  # 30 of 40 updates: fairseq-train resumes
    assert sorted(os.listdir(tmp_path)) == sorted(saves)
    assert training_complete(str(tmp_path), args[:-1])  # 30 of 30
    assert sorted(os.listdir(tmp_path)) == ["checkpoint2.pt", "checkpoint3.pt", "checkpoint_2_15.pt",
                                            "checkpoint_3_25.pt", "checkpoint_best.pt", "checkpoint_last.pt"]
    assert not training_complete(str(tmp_path), ["DATA", "--max-update", "0"])  # no limit: fairseq decides


PARENT = """
import sys
sys.path.insert(0, {repo!r})
from rela_tools.pipeline.commands import run_fairseq
from rela_tools.pipeline.train import run_logged
child = [sys.executable, "-c", "import os, time; open({pid_file!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
if {how!r} == "run_logged":
    run_logged(child, {log!r})
else:
    run_fairseq(child, "the child")
"""


def test_a_killed_pipeline_takes_its_fairseq_tools_along(tmp_path):
    """``kill -9`` of the pipeline's own process (not its group) ends the tool it runs (fairseq-train through
    run_logged, fairseq-generate through run_fairseq): no tool trains on into a run's folder behind a dead pipeline."""
    for how in ("run_logged", "run_fairseq"):
        pid_file = tmp_path / f"{how}.pid"
        parent = subprocess.Popen([sys.executable, "-c", PARENT.format(repo=REPO, pid_file=str(pid_file), how=how,
                                                                       log=str(tmp_path / "train.log"))],
                                  stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert parent.poll() is None and time.time() < deadline, f"{how}: the child never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while _alive(child):
            if time.time() > deadline:
                os.kill(child, signal.SIGKILL)
                raise AssertionError(f"{how}: the tool (pid {child}) outlived the pipeline that started it")
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.split("/")[2]))
    return found


@pytest.mark.one_python  # the signal is set by the plugin's wrapper, not by fairseq
def test_a_killed_fairseq_tool_takes_its_worker_processes_along(tmp_path):
    """The death signal reaches the tool the pipeline started; fairseq-preprocess's ``--workers`` pool is the tool's
    own: the tool's death sends its workers SIGTERM too. The workers are stopped first so that none ends of its own
    (a pool's workers end once their last chunk is done): the SIGTERM must then be pending in every one of them."""
    rng = random.Random(3)
    words = [f"w{i}" for i in range(3000)]
    for lang in ("de", "en"):
        with open(tmp_path / f"train.{lang}", "w") as f:
            for _ in range(60_000):
                f.write(" ".join(rng.choices(words, k=12)) + "\n")
    tool = subprocess.Popen([sys.executable, os.path.join(REPO, "rela_tools", "pipeline", "fairseq_tool.py"),
                             "fairseq-preprocess", "--source-lang", "de", "--target-lang", "en",
                             "--trainpref", str(tmp_path / "train"), "--destdir", str(tmp_path / "bin"),
                             "--workers", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stopped, seen = [], {}
    try:
        deadline = time.time() + 120
        while len(stopped) < 2:
            assert tool.poll() is None, "fairseq-preprocess ended before its workers could be caught"
            assert time.time() < deadline, "fairseq-preprocess started no workers"
            for worker in set(_children(tool.pid)) - set(stopped):
                if time.time() - seen.setdefault(worker, time.time()) < 0.05:
                    continue  # a worker stopped between its fork and its prctl would never get the signal
                try:
                    os.kill(worker, signal.SIGSTOP)
                    stopped.append(worker)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        tool.terminate()
        tool.wait()
        time.sleep(0.2)
        not_signalled = [w for w in stopped if _alive(w) and not _pending(w) & (1 << (signal.SIGTERM - 1))]
        assert not not_signalled, f"fairseq-preprocess's workers {not_signalled} got no signal when it died"
    finally:
        for worker in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        if tool.poll() is None:
            tool.kill()


def _pending(pid: int) -> int:
    """The signals pending for process ``pid`` (its own and its thread group's), as a bit mask."""
    with open(f"/proc/{pid}/status") as f:
        masks = dict(line.split(":\t") for line in f if line.startswith(("SigPnd", "ShdPnd")))
    return int(masks["SigPnd"], 16) | int(masks["ShdPnd"], 16)
