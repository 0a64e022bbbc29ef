"""The speed benchmark runs in quick mode and writes well-formed JSON (no timing is asserted: machines are noisy)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from rela_tools.systems import PAPER_SYSTEMS


def test_quick_benchmark_json(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--quick", "--json", out,
                           "--extra", "softmax_plugin", "rela_g_eager", "softmax_control"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| size | length | system | train tok/s | train × softmax |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["settings"]["quick"] is True
    assert data["environment"]["rela_kernel_auto"] == "fused"  # rela_g ran the kernels, rela_g_eager the operators
    rows = data["results"]
    assert {r["system"] for r in rows} == set(PAPER_SYSTEMS) | {"softmax_plugin", "rela_g_eager", "softmax_control"}
    control = {r["parameters"] for r in rows if r["system"] in ("softmax", "softmax_control")}
    assert len(control) == 1  # the control is the stock model again
    # the size is transformer_rela_tiny's: fairseq's tiny dimensions (d 64, FFN 64, 2 heads, 2+2 layers)
    assert data["sizes"]["transformer_rela_tiny"] == dict(
        encoder_embed_dim=64, encoder_ffn_embed_dim=64, encoder_attention_heads=2, encoder_layers=2,
        decoder_embed_dim=64, decoder_ffn_embed_dim=64, decoder_attention_heads=2, decoder_layers=2)
    assert {r["length"] for r in rows} == {8, 16, 32}  # 32: peak memory only (--memory-lengths)
    for r in rows:
        assert r["peak_memory_mb"] >= 0 and r["memory_ratio"] is not None
        if r["length"] == 32:
            assert r["train_tokens_per_s"] is None and r["decode_ratio"] is None
            continue
        assert r["train_tokens_per_s"] > 0 and r["decode_sentences_per_s"] > 0
        if r["system"] == "softmax":
            assert r["train_ratio"] == 1.0 and r["decode_ratio"] == 1.0
    assert "| transformer_rela_tiny | 32 | rela_g | – | – | – | – |" in proc.stdout
    assert set(data["raw"]) == {"transformer_rela_tiny/L8", "transformer_rela_tiny/L16", "transformer_rela_tiny/L32"}


def test_benchmark_measures_only_what_it_is_asked(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--quick", "--json", out,
                           "--measure", "decode", "--systems", "rela_g"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["length"], r["system"]) for r in rows} == {(n, s) for n in (8, 16) for s in ("softmax", "rela_g")}
    for r in rows:  # no memory-only length, no training, no memory
        assert r["decode_sentences_per_s"] > 0 and r["train_tokens_per_s"] is None and r["peak_memory_mb"] is None
    assert "| transformer_rela_tiny | 8 | rela_g | – | – |" in proc.stdout and "train round" not in proc.stderr


def test_benchmark_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--repeats", "0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--repeats must be at least 1, got 0" in proc.stderr


def test_step_profile_separates_relas_own_operators(tmp_path):
    """profile_step.py: per-operator self times of one training step, ReLA-g against stock softmax."""
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "--size",
                           "transformer_rela_tiny",
                           "--length", "8", "--train-tokens", "64", "--steps", "1", "--json", out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| operator | softmax ms | rela_g ms | difference ms |" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["seconds_per_step"]) == {"softmax", "rela_g"}
    ops = {row["op"]: row for row in data["ops"]}
    # ReLA-g's fused attention core and gated norm run only in ReLA-g, the attention softmax only in the stock model
    for op in ("FusedAttention", "FusedAttentionBackward", "FusedGatedRMSNorm", "FusedGatedRMSNormBackward"):
        assert ops[op]["softmax_ms"] == 0 and ops[op]["system_ms"] > 0, op
    assert ops["aten::_softmax"]["system_ms"] == 0 and ops["aten::_softmax"]["softmax_ms"] > 0
    assert ops["aten::addmm"]["softmax_ms"] > 0 and ops["aten::addmm"]["system_ms"] > 0


def test_step_profile_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "--system", "relu"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "invalid choice: 'relu'" in proc.stderr and "rela_g" in proc.stderr


def test_decoding_profile_names_the_kernels_called_outside_autograd(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "--size",
                           "transformer_rela_tiny",
                           "--mode", "decode", "--length", "6", "--decode-sentences", "3", "--train-tokens", "12",
                           "--steps", "1", "--json", out], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the decoded sentences are cut from the training batch (12 tokens: 2 sentences of 6), and the report says so
    assert "decoding 2 sentences of 6 tokens, beam 4, profiled" in proc.stdout
    ops = {row["op"]: row for row in json.loads(out.read_text())["ops"]}
    for op in ("rela_fairseq::attention_step", "rela_fairseq::norm_forward"):
        assert ops[op]["softmax_ms"] == 0 and ops[op]["system_ms"] > 0, op


def test_attention_core_benchmark_against_sdpa_quick(tmp_path):
    """benchmarks/attention_core.py: the attention core of every element-wise function against torch's SDPA, with a
    control, in quick mode (no timing is asserted)."""
    out = tmp_path / "core.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "attention_core.py"), "--quick", "--json",
                           out], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "**train** (forward + backward): speed × SDPA (> 1: faster), and peak memory × SDPA's" in proc.stdout
    assert "**decode** (one query against the cached keys, no gradients)" in proc.stdout
    rows = json.loads(out.read_text())["results"]
    systems = {"sdpa", "sdpa_control", "rela", "relu2", "rela_eager", "relu_len", "sigmoid", "products"}
    assert {(r["mode"], r["length"], r["system"]) for r in rows} == {
        (mode, length, system) for mode in ("train", "decode") for length in (32, 64) for system in systems}
    for r in rows:
        assert r["ms"] > 0 and r["speed_vs_sdpa"] > 0
        assert (r["peak_mb"] is not None) == (r["mode"] == "train")
        if r["system"] == "sdpa":
            assert r["speed_vs_sdpa"] == 1.0
    assert {r["route"] for r in rows if r["system"] in ("rela", "relu2", "relu_len", "sigmoid")} == {"fused"}
    assert {r["route"] for r in rows if r["system"] == "rela_eager"} == {"eager"}
    assert {r["route"] for r in rows if r["system"] == "products"} == {"products only"}
    # the ceiling: the machine's matrix-product rate over SDPA's rate (its seven products' arithmetic per second)
    report = json.loads(out.read_text())
    assert report["raw"]["gemm_gflops"] > 0
    assert "| d_h | keys | sdpa ms | sdpa GFLOP/s | ceiling |" in proc.stdout
    for r in rows:
        if r["mode"] == "decode":
            assert r["gflops"] is None and r["ceiling_vs_sdpa"] is None
            continue
        flops = 7 * 2 * r["length"] ** 2 * 8 * 1 * 2  # quick: d_h 8, batch 1, 2 heads
        assert r["gflops"] == pytest.approx(flops / (r["ms"] / 1000) / 1e9, rel=0.01, abs=0.1)
        if r["system"] == "sdpa":
            assert r["ceiling_vs_sdpa"] == pytest.approx(report["raw"]["gemm_gflops"] / r["gflops"], rel=0.02)
        else:
            assert r["ceiling_vs_sdpa"] is None


def test_the_products_floor_computes_the_attention_products_and_their_gradients():
    """``products``: O = (scale · Q Kᵀ) V with its seven matrix products, the gradients of the plain expression."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import attention_core

    q, k, v = (torch.randn(3, 5, 4, dtype=torch.double, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: attention_core._Products.apply(q, k, v, 0.5), (q, k, v))
    out = attention_core.core("products", None, heads=1)(q, k, v)
    torch.testing.assert_close(out, torch.bmm(torch.bmm(q * 0.5, k.transpose(1, 2)), v))


def test_attention_core_benchmark_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "attention_core.py"), "--lengths", "0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--lengths must be at least 1, got [0]" in proc.stderr


def test_peak_allocated_memory_is_the_most_held_at_once():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import attention_core

    def work():
        first = torch.empty(1 << 20)  # 4 MiB, released before the second
        del first
        second = torch.empty(2 << 20)  # 8 MiB
        return second
    assert attention_core.peak_allocated_mb(work) == pytest.approx(8.0, abs=0.01)


def test_the_fused_core_scratch_is_counted_for_every_thread():
    """The kernels allocate each thread's scratch on the calling thread, so that the allocator's accounting (and the
    memory comparison with SDPA, which does the same) sees all of it: with 2 threads, the forward holds its output and
    two score blocks of 128 queries × 512 keys (a quarter of 512 × 512: the query block between 64K and 256K scores)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import attention_core

    from rela_fairseq import kernels

    ext = kernels.BACKENDS["cpu"].load()
    if ext is None:
        pytest.fail(f"the fused CPU kernels do not build here: {kernels.BACKENDS['cpu'].failure}")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = (torch.randn(4, 512, 64) for _ in range(3))
        peak = attention_core.peak_allocated_mb(
            lambda: kernels.fused_attention(ext, q, k, v, heads=2, scale=0.125, activation="relu"))
    finally:
        torch.set_num_threads(threads)
    out, block = 4 * 512 * 64 * 4, 128 * 512 * 4
    assert peak == pytest.approx((out + 2 * block) / 2**20, abs=0.01)
