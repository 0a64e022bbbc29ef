"""Checkpoints on torch >= 2.6: every type the project writes loads with weights_only=True through the plugin's
allow-list, nothing switches the check off, averaging works, and hub loading translates."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, run_cli


def checkpoint_files(save_dir):
    names = sorted(os.listdir(save_dir))
    kinds = {
        "last": [n for n in names if n == "checkpoint_last.pt"],
        "best": [n for n in names if n == "checkpoint_best.pt"],
        "epoch": [n for n in names if n[len("checkpoint"):-3].isdigit()],
        "update": [n for n in names if n.count("_") == 2 and n.endswith(".pt")],
    }
    assert all(kinds.values()), kinds
    return [save_dir / n for ns in kinds.values() for n in ns]


@pytest.fixture(scope="module")
def averaged(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("avg") / "averaged.pt"
    run_cli("rela-average-checkpoints", "--inputs", trained("rela_g"), "--num-update-checkpoints", 2,
            "--output", out)
    return out


def load_in_fresh_process(paths, import_plugin):
    code = (
        "import sys, torch\n"
        + ("import rela_fairseq\n" if import_plugin else "")
        + "for p in sys.argv[1:]:\n"
        "    torch.load(p, map_location='cpu')  # torch's default: weights_only=True\n"
        "print('loaded', len(sys.argv) - 1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    return subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                           cwd=REPO, env=env)


@pytest.fixture(scope="module")
def stock_checkpoint(toy_bin, tmp_path_factory):
    """A stock fairseq transformer checkpoint: its model config is an argparse.Namespace."""
    from helpers import TINY_TRAIN_ARGS

    save_dir = tmp_path_factory.mktemp("stock")
    args = [a if a != "transformer_rela_tiny" else "transformer_tiny" for a in TINY_TRAIN_ARGS]
    run_cli("fairseq-train", toy_bin, *args, "--save-dir", save_dir, "--max-update", 2)
    return save_dir / "checkpoint_last.pt"


def test_every_checkpoint_type_loads_weights_only_through_the_allow_list(trained, averaged, stock_checkpoint):
    paths = checkpoint_files(trained("rela_g")) + [averaged, stock_checkpoint]
    with_plugin = load_in_fresh_process(paths, import_plugin=True)
    assert with_plugin.returncode == 0, with_plugin.stderr[-3000:]
    assert f"loaded {len(paths)}" in with_plugin.stdout
    # the check itself stays on: without the plugin's allow-list a stock checkpoint (argparse.Namespace) is refused
    without = load_in_fresh_process([stock_checkpoint], import_plugin=False)
    assert without.returncode != 0 and "argparse.Namespace" in without.stderr
    # transformer_rela's own checkpoints store their model config through the dataclass: plain containers only
    assert load_in_fresh_process(paths[:-1], import_plugin=False).returncode == 0


def test_allow_list_is_exactly_what_fairseq_checkpoints_need():
    import argparse

    from rela_fairseq import compat

    assert compat.fairseq_checkpoint_globals() == [argparse.Namespace]
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ


def test_averaging_is_the_mean_of_the_inputs(trained, averaged):
    save_dir = trained("rela_g")
    inputs = sorted((p for p in save_dir.iterdir() if p.name.count("_") == 2),
                    key=lambda p: int(p.stem.split("_")[-1]))[-2:]
    states = [torch.load(p, weights_only=True)["model"] for p in inputs]
    avg = torch.load(averaged, weights_only=True)["model"]
    key = "decoder.layers.1.encoder_attn.attn_fn.norm.gate_weight"
    torch.testing.assert_close(avg[key], sum(s[key] for s in states) / 2)
    assert avg["encoder.layers.0.self_attn.attn_fn._extra_state"]["attn_fn"] == "rela"


def test_averaging_reports_too_few_checkpoints(trained, tmp_path):
    proc = run_cli("rela-average-checkpoints", "--inputs", trained("rela_g"), "--num-update-checkpoints", 50,
                   "--output", tmp_path / "x.pt", check=False)
    assert proc.returncode != 0 and "fewer than the 50 to average" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.pt").exists()


def test_hub_from_pretrained_translates(trained, toy_bin, averaged):
    from rela_fairseq.models import RelaTransformerModel

    hub = RelaTransformerModel.from_pretrained(str(averaged.parent), checkpoint_file=averaged.name,
                                               data_name_or_path=str(toy_bin), source_lang="src", target_lang="tgt")
    hub.eval()
    out = hub.translate(["now the cat sees a dog", "yesterday the king finds some apples"], beam=2)
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)
    assert hub.models[0].encoder.layers[0].self_attn.attn_fn.name == "rela"
