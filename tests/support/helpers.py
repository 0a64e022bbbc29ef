"""Shared test helpers: tiny models without data files, and the real command-line tools."""

import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from tool_server import STARTUP_ENV, ForkedTool, is_console_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/support/..
USER_DIR = os.path.join(REPO, "rela_fairseq")
BIN_DIR = os.path.dirname(sys.executable)

from fairseq.data import Dictionary  # noqa: E402
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY  # noqa: E402

import rela_fairseq  # noqa: E402,F401  registers the model

ATTN_FNS = ("softmax", "sparsemax", "entmax15", "entmax_alpha", "rela", "sigmoid", "relu_len", "softmax_null")


def attention_function(name, embed_dim, num_heads, **settings):
    """One attention function, ``settings`` as AttentionSettings fields (rela_variant="init", ...)."""
    from rela_fairseq.attention_functions import build_attention_function
    from rela_fairseq.settings import AttentionSettings

    return build_attention_function(embed_dim, num_heads, AttentionSettings(attn_fn=name, **settings))


class FakeTask:
    """What build_model needs from a task: two dictionaries."""

    def __init__(self, vocab_size=20):
        self.src_dict = self.tgt_dict = Dictionary()
        for i in range(vocab_size):
            self.src_dict.add_symbol(f"w{i}")

    @property
    def source_dictionary(self):
        return self.src_dict

    @property
    def target_dictionary(self):
        return self.tgt_dict


def build_model(arch="transformer_rela_tiny", task=None, seed=0, no_dropout=True, **options):
    """A model of ``arch`` with ``options`` (argparse names with underscores), as fairseq-train would build it."""
    torch.manual_seed(seed)
    if no_dropout:
        options = dict(dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0), **options)
    args = argparse.Namespace(**options)
    ARCH_CONFIG_REGISTRY[arch](args)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, task or FakeTask())
    return model.eval()


def left_padded_batch(dictionary, lengths, seed=0):
    """src_tokens [B, max(lengths)] left-padded, ending in EOS, as fairseq's translation task batches them."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    tokens = torch.full((len(lengths), width), dictionary.pad(), dtype=torch.long)
    for row, n in enumerate(lengths):
        words = torch.randint(dictionary.nspecial, len(dictionary), (n - 1,), generator=gen)
        tokens[row, width - n:] = torch.cat([words, torch.tensor([dictionary.eos()])])
    return tokens, torch.tensor(lengths)


def start_cli(tool, *args, input=None, cwd=None, env=None):
    """Start one of the installed console scripts (fairseq-train, rela-analyze, ...) as a user would: forked from a
    server that has imported the heavy libraries fairseq imports once (tool_server.py), or as a new interpreter where
    the call changes how Python starts (PYTHONPATH, ...), where ``tool`` is no console script, or everywhere with
    RELA_TESTS_NEW_INTERPRETERS=1."""
    exe = os.path.join(BIN_DIR, tool)
    cmd = [exe if os.path.exists(exe) else tool, *map(str, args)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    forkable = cmd[0] == exe and is_console_script(tool) and not any(k.startswith(STARTUP_ENV) for k in env or {})
    if forkable and os.environ.get("RELA_TESTS_NEW_INTERPRETERS") != "1":
        proc = ForkedTool(cmd[0], cmd[1:], input, cwd, full_env)
    else:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=cwd, env=full_env)
    proc.cmd, proc.input = cmd, input
    return proc


def imported_modules(stderr):
    """The modules a ``python -X importtime`` run imported, from its stderr."""
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def finish_cli(proc, check=True, timeout=900):
    stdout, stderr = proc.communicate(proc.input, timeout=timeout)
    result = subprocess.CompletedProcess(proc.cmd, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(proc.cmd)} exited with {result.returncode}\n--- stderr (end) ---\n{stderr[-4000:]}"
                    f"\n--- stdout (end) ---\n{stdout[-2000:]}")
    return result


def run_cli(tool, *args, input=None, check=True, cwd=None, env=None, timeout=900):
    """Run one of the installed console scripts and wait for it."""
    return finish_cli(start_cli(tool, *args, input=input, cwd=cwd, env=env), check=check, timeout=timeout)


TINY_TRAIN_ARGS = [
    "--user-dir", USER_DIR, "--arch", "transformer_rela_tiny", "--task", "translation",
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.005",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--max-tokens", "1000", "--cpu", "--num-workers", "0", "--seed", "1",
    "--no-progress-bar", "--log-format", "simple", "--log-interval", "5",
]


def parse_generate_output(stdout):
    """{sentence id: {"H": hypothesis, "A": alignment, "S": source, ...}} from fairseq-generate's output."""
    out = {}
    for line in stdout.splitlines():
        if len(line) > 2 and line[1] == "-" and line[0] in "SHTDPA":
            head, _, rest = line.partition("\t")
            kind, sid = head.split("-", 1)
            fields = rest.split("\t")
            out.setdefault(int(sid), {})[kind] = fields[-1]
    return out


# --------------------------------------------------------------------------- the pipeline in tmp folders

def copy_configs(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(os.path.join(REPO, "configs"), configs)
    return configs


def edit_yaml(path, edit):
    data = yaml.safe_load(open(path))
    edit(data)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)


def pipeline_folders(tmp_path, monkeypatch):
    """The pipeline's configs (a copy), data, checkpoints and results under ``tmp_path``; returns the configs folder."""
    configs = copy_configs(tmp_path)
    for name, value in (("RELA_CONFIG_DIR", configs), ("DATA_ROOT", tmp_path / "data"),
                        ("CHECKPOINT_ROOT", tmp_path / "checkpoints"), ("RESULTS_ROOT", tmp_path / "results")):
        monkeypatch.setenv(name, str(value))
    return configs


# attention modules for the unit tests of the math and of the kernels
EMBED, HEADS = 16, 4


def make_attention(fn="rela", embed_dim=EMBED, heads=HEADS, seed=0, dtype=torch.float32, kv_dim=None,
                   entmax_bisect_iters=25, **fn_options):
    from rela_fairseq.attention import RelaMultiheadAttention

    torch.manual_seed(seed)
    attn_fn = attention_function(fn, embed_dim, heads, entmax_bisect_iters=entmax_bisect_iters, **fn_options)
    if kv_dim is None:
        module = RelaMultiheadAttention(embed_dim, heads, attn_fn=attn_fn, self_attention=True)
    else:
        module = RelaMultiheadAttention(embed_dim, heads, attn_fn=attn_fn, kdim=kv_dim, vdim=kv_dim,
                                        encoder_decoder_attention=True)
    with torch.no_grad():  # make the extra parameters non-trivial
        for p in module.attn_fn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.to(dtype).eval()


# the reproduction scripts, as users run them
SCRIPTS = os.path.join(REPO, "scripts")


LOCK_HOLDER = """
import sys, time
from rela_tools.files import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def hold_lock(path):
    """Another process holding ``files.exclusive_lock(path)`` until it is killed; returned once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "holding\n"
    return holder


def script_env(tmp, **extra):
    env = dict(os.environ, RELA_PYTHON=sys.executable, DATA_ROOT=str(tmp / "data"),
               CHECKPOINT_ROOT=str(tmp / "checkpoints"), RESULTS_ROOT=str(tmp / "results"), PYTHONUNBUFFERED="1")
    env.pop("RELA_DOWNLOAD_MIRROR", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def script_command(name, *args):
    return ["bash", os.path.join(SCRIPTS, name), *map(str, args)]


def run_script(name, *args, env, check=True, timeout=900):
    proc = subprocess.run(script_command(name, *args), capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{name} {' '.join(map(str, args))} exited with {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc
