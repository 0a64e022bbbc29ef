"""End to end through fairseq's own command-line tools with --user-dir, for every system."""

import difflib
import re

import pytest
import torch
from conftest import TINY_SIZES, train, train_args
from helpers import USER_DIR, finish_cli, parse_generate_output, run_cli, start_cli

from rela_tools.systems import SYSTEMS


def generate_args(data, checkpoint, *extra):
    return [data, "--user-dir", USER_DIR, "--path", checkpoint, "--beam", 3, "--batch-size", 16,
            "--required-batch-size-multiple", 1, "--cpu", "--gen-subset", "test", *extra]


def generate(data, checkpoint, *extra, check=True):
    return run_cli("fairseq-generate", *generate_args(data, checkpoint, *extra), check=check)


# the entmax family's mappings (the entmax package) do not depend on fairseq's version, and the command-line plumbing
# they share with softmax and ReLA runs under both: they run once, under Python 3.11 (marker one_python, conftest.py)
ONE_PYTHON_SYSTEMS = ("sparsemax", "entmax15", "entmax_alpha")


@pytest.mark.parametrize("system", [pytest.param(s, marks=pytest.mark.one_python) if s in ONE_PYTHON_SYSTEMS else s
                                    for s in SYSTEMS])
def test_train_resume_generate_interactive(system, trained, toy_bin):
    save_dir = trained(system)
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)  # through the plugin's allow-list
    settings = state["model"]["decoder.layers.0.encoder_attn.attn_fn._extra_state"]
    assert settings["attn_fn"] == SYSTEMS[system].options["attn_fn"]

    # generation and interactive decoding run side by side (each spends seconds importing fairseq)
    inter_proc = start_cli("fairseq-interactive", toy_bin, "--user-dir", USER_DIR, "--path",
                           save_dir / "checkpoint_last.pt", "--beam", 2, "--cpu", "--source-lang", "src",
                           "--target-lang", "tgt",
                           input="now the cat sees a dog\nyesterday some big kings find the old book quickly\n")
    gen = generate(toy_bin, save_dir / "checkpoint_last.pt", "--print-alignment")
    out = parse_generate_output(gen.stdout)
    assert len(out) == TINY_SIZES["test"], "every test sentence is translated (--required-batch-size-multiple 1)"
    for sentence in out.values():
        assert "H" in sentence and "A" in sentence
        n_target = len(sentence["H"].split()) + 1  # + EOS
        for link in sentence["A"].split():
            src, tgt = map(int, link.split("-"))
            assert 0 <= tgt < n_target
    assert "BLEU4" in gen.stdout

    inter = finish_cli(inter_proc)
    hypotheses = [line for line in inter.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 2


def test_generation_runs_our_attention_not_softmax(trained, toy_bin, tmp_path):
    """The same weights decoded with ReLA and with softmax give different translations: generation (left-padded
    batches, encoder included) really runs the plugin's attention on this fairseq version."""
    save_dir = tmp_path / "rela_nonorm"
    train(toy_bin, save_dir, 16, "--attn-fn", "rela", "--rela-variant", "init", "--rela-norm", "none")
    as_softmax = start_cli("fairseq-generate", *generate_args(
        toy_bin, save_dir / "checkpoint_last.pt",
        "--model-overrides", "{'attn_fn': 'softmax', 'allow_attn_fn_change': True}"))
    rela = parse_generate_output(generate(toy_bin, save_dir / "checkpoint_last.pt").stdout)
    softmax = parse_generate_output(finish_cli(as_softmax).stdout)
    assert rela.keys() == softmax.keys() and len(rela) == TINY_SIZES["test"]
    differ = sum(rela[i]["H"] != softmax[i]["H"] for i in rela)
    assert differ > len(rela) // 2, f"only {differ} of {len(rela)} translations differ"


def test_bad_attention_options_are_rejected_at_argument_parsing(toy_bin, tmp_path):
    bad = (("--attn-fn", "relu"), ("--cross-attn-fn", "linear"), ("--rela-variant", "gate"), ("--rela-norm", "batch"),
           ("--rela-activation", "gelu"), ("--attn-qkv-bias-init", "ones"))
    procs = [start_cli("fairseq-train", *train_args(toy_bin, tmp_path / "never", 1, option, value))
             for option, value in bad]
    for (option, value), started in zip(bad, procs):
        proc = finish_cli(started, check=False)
        assert proc.returncode != 0
        assert f"argument {option}: invalid choice: '{value}'" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists() or not any((tmp_path / "never").iterdir())


def test_bad_override_at_generation_is_one_clear_line(trained, toy_bin):
    proc = generate(toy_bin, trained("rela_g") / "checkpoint_last.pt", "--model-overrides", "{'attn_fn': 'relu'}",
                    check=False)
    assert proc.returncode != 0
    assert "rela_fairseq: error: unknown attention function 'relu'; choose one of softmax, sparsemax, entmax15, " \
           "entmax_alpha, rela" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resuming_with_other_attention_settings_fails_clearly_and_keeps_the_checkpoint(trained, toy_bin, tmp_path):
    import shutil

    save_dir = tmp_path / "resume"
    shutil.copytree(trained("rela_g"), save_dir)
    before = (save_dir / "checkpoint_last.pt").read_bytes()
    proc = train(toy_bin, save_dir, 30, "--attn-fn", "softmax", check=False)
    assert proc.returncode != 0
    assert "rela_fairseq: error: the checkpoint's attention settings differ from this model's" in proc.stderr
    assert "checkpoint rela (relu, norm=rms, scope=all, gated), model softmax" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (save_dir / "checkpoint_last.pt").read_bytes() == before


def test_missing_entmax_names_the_install_command(toy_bin, tmp_path):
    hide = tmp_path / "hide_entmax"
    hide.mkdir()
    (hide / "entmax.py").write_text("raise ImportError('No module named entmax')\n")
    proc = run_cli("fairseq-train", *train_args(toy_bin, tmp_path / "ck", 1, "--attn-fn", "sparsemax"), check=False,
                   env={"PYTHONPATH": str(hide)})
    assert proc.returncode != 0
    assert ("rela_fairseq: error: --attn-fn sparsemax needs the 'entmax' package, which is not installed; "
            "install it with: pip install entmax") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_crafted_checkpoint_is_refused_and_its_code_does_not_run(toy_bin, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    crafted = tmp_path / "checkpoint_evil.pt"
    torch.save({"model": {}, "cfg": Payload()}, crafted)
    proc = generate(toy_bin, crafted, check=False)
    assert proc.returncode != 0
    assert "weights_only" in proc.stderr.lower() or "Unsupported global" in proc.stderr
    assert not marker.exists(), "unpickling the checkpoint ran its code"


def test_forked_tools_behave_like_new_interpreters(trained, toy_raw, toy_bin, tmp_path, monkeypatch):
    """The suite runs the console scripts forked from the tool server, which imported fairseq once: a call gives
    the same output on the same streams, and the same exit code, as the same call in a new interpreter (logging as
    fairseq's own modules set it up, before or after importing fairseq; the plugin's one-line errors)."""
    checkpoint = trained("rela_g") / "checkpoint_last.pt"
    calls = {
        "bad option": ("fairseq-train", *train_args(toy_bin, tmp_path / "bad", 1, "--rela-variant", "gate")),
        "bad override": ("fairseq-generate", *generate_args(toy_bin, checkpoint, "--model-overrides",
                                                            "{'attn_fn': 'relu'}")),
        "bad file": ("rela-analyze", "aer", toy_bin / "dict.src.txt", toy_bin / "dict.tgt.txt"),
        # configures logging after importing fairseq: fairseq's speech task's set-up wins, on stderr
        "preprocess": ("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--workers", "1",
                       "--trainpref", toy_raw / "valid", "--destdir", tmp_path / "{}" / "bin"),
        # configures logging before importing fairseq: its own set-up, on stdout
        "train": ("fairseq-train", *train_args(toy_bin, tmp_path / "{}" / "ckpt", 2, "--no-save")),
        "generate": ("fairseq-generate", *generate_args(toy_bin, checkpoint)),
    }
    for name, call in calls.items():
        results = {}
        for new in ("1", "0"):
            monkeypatch.setenv("RELA_TESTS_NEW_INTERPRETERS", new)
            proc = run_cli(*(str(a).replace("{}", new) for a in call), check=False)
            # what may differ: times and speeds (fairseq prints "wps 95.3" but "wps 1234"), the folder this
            # comparison names after the way the call ran, and where hydra's warning about fairseq's config schema
            # is said to come from: the frame above the script, none in a new interpreter ("sys"), runpy's in a fork
            results[new] = (proc.returncode, *(re.sub(r"\d+(\.\d+)?", "0", out.replace(str(tmp_path), ""))
                                               .replace("<frozen runpy>:0: UserWarning", "sys:0: UserWarning")
                                               for out in (proc.stdout, proc.stderr)))
        if name.startswith("bad"):
            assert results["1"][0] != 0 and "Traceback" not in results["1"][2], name
        else:
            assert results["1"][0] == 0, (name, results["1"][2][-2000:])
        for what, fresh, forked in zip(("exit code", "stdout", "stderr"), results["1"], results["0"]):
            assert forked == fresh, f"{name}: {what} differs\n" + "".join(difflib.unified_diff(
                str(fresh).splitlines(True), str(forked).splitlines(True), "new interpreter", "forked"))
