"""The speed benchmark runs in quick mode and writes well-formed JSON (no timing is asserted: machines are noisy)."""

import json
import os
import subprocess
import sys

from helpers import REPO

SYSTEMS = {"softmax", "sparsemax", "entmax15", "entmax_alpha", "rela_g", "rela_i"}


def test_quick_benchmark_json(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--quick", "--json", out,
                           "--extra", "softmax_plugin"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| config | length | system | train tok/s | train × softmax |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["settings"]["quick"] is True
    rows = data["results"]
    assert {r["system"] for r in rows} == SYSTEMS | {"softmax_plugin"}
    assert {r["length"] for r in rows} == {8, 16}
    for r in rows:
        assert r["train_tokens_per_s"] > 0 and r["decode_sentences_per_s"] > 0 and r["peak_memory_mb"] >= 0
        if r["system"] == "softmax":
            assert r["train_ratio"] == 1.0 and r["decode_ratio"] == 1.0
    assert set(data["raw"]) == {"tiny/L8", "tiny/L16"}


def test_benchmark_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--repeats", "0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--repeats must be at least 1, got 0" in proc.stderr
