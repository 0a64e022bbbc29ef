"""fairseq-hydra-train builds transformer_rela from its dataclass: plugin options are honoured and validated."""

from helpers import USER_DIR, run_cli

COMMON = ["task=translation", "task.source_lang=src", "task.target_lang=tgt", f"common.user_dir={USER_DIR}",
          "criterion=cross_entropy", "optimizer=adam", "lr_scheduler=fixed", "optimization.lr=[0.001]",
          "dataset.max_tokens=1000", "optimization.max_update=2", "common.cpu=true", "dataset.num_workers=0",
          "common.log_format=simple"]
SMALL = ",".join(f"{side}_{option}" for side in ("encoder", "decoder")
                 for option in ("layers:1", "embed_dim:32", "ffn_embed_dim:32", "attention_heads:2"))
# HYDRA_FULL_ERROR: hydra 1.0.7 (fairseq 0.12.2) cannot print its own errors on Python 3.10 otherwise
ENV = {"HYDRA_FULL_ERROR": "1"}


def hydra_train(data, save_dir, model, check=True):
    return run_cli("fairseq-hydra-train", f"task.data={data}", f"checkpoint.save_dir={save_dir}", *COMMON,
                   f"+model={{{model}}}", cwd=save_dir.parent, env=ENV, check=check)


def test_hydra_train_honours_the_attention_options_and_generate_loads_it(toy_bin, tmp_path):
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    proc = hydra_train(toy_bin, save_dir, f"_name:transformer_rela,attn_fn:sparsemax,cross_attn_fn:rela,"
                                          f"rela_norm_scope:head,attn_qkv_bias_init:zero,{SMALL}")
    log = proc.stdout + proc.stderr
    assert log.count("(attn_fn): Sparsemax()") == 2  # encoder and decoder self-attention
    assert "(norm): RelaNorm(32, norm=rms, scope=head, gated)" in log  # cross-attention, per-head norm
    assert "done training" in log
    gen = run_cli("fairseq-generate", toy_bin, "--user-dir", USER_DIR, "--path", save_dir / "checkpoint_last.pt",
                  "--beam", 2, "--cpu", "--max-tokens", 2000, "--required-batch-size-multiple", 1)
    assert "Translated 37 sentences" in gen.stdout + gen.stderr


def test_hydra_train_rejects_a_misspelt_option(toy_bin, tmp_path):
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    proc = hydra_train(toy_bin, save_dir, "_name:transformer_rela,atn_fn:sparsemax", check=False)
    assert proc.returncode != 0
    assert "Key 'atn_fn' not in 'RelaTransformerConfig'" in proc.stdout + proc.stderr
    assert not list(save_dir.iterdir())
