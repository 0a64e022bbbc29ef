"""Session fixtures: the toy task, written and binarised once through the real command-line tools."""

import os
import re
import shlex
import sys

import pytest
import tool_server
from archive_server import ArchiveServer
from helpers import TINY_TRAIN_ARGS, run_cli
from tool_client import SOCKET_VAR

from rela_tools.systems import SYSTEMS

# small enough to train a few dozen updates in seconds, large enough for several batches
TINY_SIZES = {"train": 500, "valid": 48, "test": 37}  # 37: not a multiple of fairseq's batch multiple of 8


@pytest.fixture(scope="session", autouse=True)
def fused_kernels():
    """Build the fused ReLA kernels once, first (about half a minute the first time on a machine), so that no test's
    command waits for the compiler. Under RELA_FAIRSEQ_KERNEL=fused (scripts/test.sh, Python 3.11) they must build:
    every ReLA model of the suite then runs through them."""
    from rela_fairseq import kernels

    if kernels.selected("auto") == "eager":
        return None
    module = kernels._CpuExtension.load()
    if os.environ.get(kernels.ENV_VAR) == "fused":
        failure = kernels._CpuExtension.failure
        assert module is not None, f"RELA_FAIRSEQ_KERNEL=fused, but the kernels did not build: {failure}"
    return module


@pytest.fixture(scope="session", autouse=True)
def pipeline_tools_from_the_tool_server():
    """The fairseq tools the pipeline's scripts start are forked from the suite's tool server too (tool_client.py,
    through the pipeline's RELA_TOOL_PREFIX), unless RELA_TESTS_NEW_INTERPRETERS=1. The scripts themselves, the
    pipeline's driver and torchrun start as they do for users."""
    if os.environ.get("RELA_TESTS_NEW_INTERPRETERS") == "1":
        yield
        return
    client = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "tool_client.py")
    settings = {"RELA_TOOL_PREFIX": shlex.join([sys.executable, "-S", "-E", client]),
                SOCKET_VAR: tool_server.server().socket_path}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield
    tool_server.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def toy_raw(tmp_path_factory):
    from rela_tools.toy import write_task

    out = tmp_path_factory.mktemp("toy_raw")
    write_task(str(out), TINY_SIZES)
    return out


@pytest.fixture(scope="session")
def toy_bin(toy_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_bin")
    run_cli("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
            "--trainpref", toy_raw / "train", "--validpref", toy_raw / "valid", "--testpref", toy_raw / "test",
            "--destdir", out, "--workers", "1")
    assert (out / "dict.src.txt").exists()
    return out


def train_args(data, save_dir, max_update, *extra):
    """fairseq-train's arguments for a tiny model on ``data``."""
    return [data, *TINY_TRAIN_ARGS, "--save-dir", save_dir, "--max-update", max_update, "--save-interval-updates", 5,
            *extra]


def train(data, save_dir, max_update, *extra, check=True):
    return run_cli("fairseq-train", *train_args(data, save_dir, max_update, *extra), check=check)


def last_num_updates(log):
    return max(int(n) for n in re.findall(r"num_updates[= ](\d+)", log))


@pytest.fixture(scope="session")
def trained(toy_bin, tmp_path_factory):
    """{system: checkpoint dir}, each trained 10 updates and then resumed to 16 (trained on first use)."""
    cache = {}

    def get(system):
        if system not in cache:
            save_dir = tmp_path_factory.mktemp(f"ckpt_{system}")
            first = train(toy_bin, save_dir, 10, *SYSTEMS[system].fairseq_args())
            assert last_num_updates(first.stdout + first.stderr) == 10
            resumed = train(toy_bin, save_dir, 16, *SYSTEMS[system].fairseq_args())
            log = resumed.stdout + resumed.stderr
            assert re.search(r"[Ll]oaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 10 updates\)", log), log[-3000:]
            assert last_num_updates(log) == 16
            cache[system] = save_dir
        return cache[system]

    return get


# scripts/test.sh runs the suite under Python 3.11 and 3.10 side by side, and each test marked one_python (what does not
# depend on fairseq's version) under one of them: these modules' under 3.10, the others' under 3.11, so that the two
# legs take about as long (test_compare.py's tune and compare run on Multi30k is a third of the 3.11 leg alone)
ONE_PYTHON_UNDER_310 = ("tests/pipeline/test_compare.py",)
LEG_VAR = "RELA_TESTS_LEG"  # set by scripts/test.sh when both legs run: the leg this process is


def one_python_leg(item) -> str:
    path = os.path.relpath(str(item.path), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return "3.10" if path.replace(os.sep, "/") in ONE_PYTHON_UNDER_310 else "3.11"


def pytest_collection_modifyitems(config, items):
    """Under scripts/test.sh's two legs, deselect the one_python tests that the other leg runs (ONE_PYTHON_UNDER_310);
    a plain pytest run, or a single leg (--py), runs them all."""
    leg = os.environ.get(LEG_VAR)
    if not leg:
        return
    other = [item for item in items if item.get_closest_marker("one_python") and one_python_leg(item) != leg]
    if other:
        config.hook.pytest_deselected(items=other)
        deselected = set(other)
        items[:] = [item for item in items if item not in deselected]


def pytest_report_header(config):
    import fairseq
    import torch

    return f"fairseq {fairseq.__version__}, torch {torch.__version__}, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=" \
           f"{os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '(unset)')}"


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving the folder ``server.folder`` (archives the tests build)."""
    folder = tmp_path / "served"
    folder.mkdir()
    srv = ArchiveServer(str(folder)).start()
    yield srv
    srv.shutdown()
