"""evaluate: average the last checkpoints, decode the test set, detokenise, score with SacreBLEU (and chrF).

The reference is the official test set exactly as distributed (``raw/test.ref``, the same text ``sacrebleu -t`` reads),
so the score equals ``sacrebleu -t <test set> -l <pair>`` on the same output, offline. For WMT14 En-De the tokenised,
compound-split BLEU of older papers is added, labelled as such. One JSON result per task and system.
"""

import datetime
import json
import logging
import os
import re
import subprocess

from ..averaging import average_checkpoints, save_atomically
from ..errors import RelaFairseqError
from ..systems import LABELS
from .prepare import read_lines, tool, write_lines
from .train import USER_DIR, hardware

logger = logging.getLogger("rela_fairseq.pipeline")


def checkpoint_updates(path):
    """The number of updates a checkpoint was saved at (memory-mapped: the weights are not read)."""
    import torch

    from .. import compat

    compat.allow_fairseq_checkpoints()
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state["optimizer_history"][-1]["num_updates"])


def checkpoints_to_average(checkpoint_dir, n):
    """The ``n`` checkpoints with the most updates, newest first, among update, epoch and last checkpoints.

    fairseq writes an update checkpoint only when it does not fall on an epoch end, so the newest state may be in an
    epoch checkpoint or only in checkpoint_last.pt; each counts once."""
    pattern = re.compile(r"checkpoint(\d+|_\d+_\d+|_last)\.pt$")
    by_updates = {}
    for name in sorted(os.listdir(checkpoint_dir)):
        if pattern.fullmatch(name):
            path = os.path.join(checkpoint_dir, name)
            by_updates.setdefault(checkpoint_updates(path), path)
    if not by_updates:
        raise RelaFairseqError(f"no checkpoints in {checkpoint_dir}: train the system first (scripts/train.sh)")
    paths = [by_updates[u] for u in sorted(by_updates, reverse=True)[:n]]
    if len(paths) < n:
        logger.warning(f"averaging {len(paths)} checkpoint(s), fewer than the {n} the config asks for")
    return paths


def decode(task, checkpoint, settings, gpus, fp16):
    """Hypotheses (sentencepiece pieces) of the test set, in test-set order."""
    cmd = [tool("fairseq-generate"), task.bin_dir, "--user-dir", USER_DIR, "--path", checkpoint,
           "--gen-subset", "test", "--source-lang", task.src, "--target-lang", task.tgt,
           "--beam", str(settings.get("beam", 4)), "--lenpen", str(settings.get("lenpen", 1.0)),
           "--max-tokens", str(settings.get("max_tokens", 8000)),
           # fairseq otherwise drops the last batch when its size is not a multiple of 8 (fairseq#5036)
           "--required-batch-size-multiple", "1", "--no-progress-bar"]
    cmd += ["--fp16"] if fp16 else ([] if gpus else ["--cpu"])
    logger.info("running: " + " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RelaFairseqError(f"fairseq-generate failed ({out.returncode}):\n{out.stderr[-3000:]}")
    hyps = {}
    for line in out.stdout.splitlines():
        if line.startswith("H-"):
            head, _score, text = line.split("\t", 2)
            hyps[int(head[2:])] = text
    return [hyps[i] for i in sorted(hyps)], out.stdout


def detokenise(task, pieces_lines):
    import sentencepiece as spm

    model = spm.SentencePieceProcessor(model_file=task.path("spm", "spm.model"))
    return [model.decode_pieces(line.split()) for line in pieces_lines]


def tokenized_compound_split(lines, lang):
    """Moses tokenisation, then every hyphen between two non-spaces becomes " ##AT##-##AT## " (tensor2tensor's
    get_ende_bleu.sh, fairseq's compound_split_bleu.sh)."""
    from sacremoses import MosesTokenizer

    tokenizer = MosesTokenizer(lang=lang)
    return [re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", tokenizer.tokenize(line, return_str=True, escape=True))
            for line in lines]


def score(task, hyps, refs):
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    result = {
        "sacrebleu": {"score": round(bleu_score.score, 2), "signature": str(bleu.get_signature()),
                      "text": bleu_score.format(signature=str(bleu.get_signature()))},
        "chrf": {"score": round(chrf_score.score, 2), "signature": str(chrf.get_signature()),
                 "text": chrf_score.format(signature=str(chrf.get_signature()))},
    }
    if task["evaluate"].get("tokenized_bleu"):
        tok = BLEU(tokenize="none", force=True)
        tok_score = tok.corpus_score(tokenized_compound_split(hyps, task.tgt),
                                     [tokenized_compound_split(refs, task.tgt)])
        result["tokenized_bleu"] = {
            "score": round(tok_score.score, 2),
            "label": "tokenised BLEU: Moses tokeniser + compound splitting (multi-bleu.perl style); "
                     "NOT comparable with SacreBLEU",
        }
    return result


def evaluate(task, system):
    import fairseq
    import sacrebleu
    import torch

    settings = task["evaluate"]
    checkpoint_dir = task.checkpoint_dir(system)
    if not os.path.isdir(checkpoint_dir):
        raise RelaFairseqError(f"no checkpoints for {task.name}/{system} in {checkpoint_dir}: run "
                               f"scripts/train.sh {task.name} {system} first")
    inputs = checkpoints_to_average(checkpoint_dir, settings.get("average_last", 5))
    if len(inputs) > 1:
        checkpoint = os.path.join(checkpoint_dir, f"checkpoint_avg{len(inputs)}.pt")
        logger.info(f"averaging {', '.join(os.path.basename(p) for p in inputs)}")
        save_atomically(average_checkpoints(inputs), checkpoint)
    else:
        checkpoint = inputs[0]
    gpus, fp16, _, _ = hardware()
    pieces, generate_log = decode(task, checkpoint, settings, gpus, fp16)
    refs = read_lines(task.path("raw", "test.ref"))
    if len(pieces) != len(refs):
        raise RelaFairseqError(f"fairseq-generate translated {len(pieces)} sentences but the test set has "
                               f"{len(refs)}; refusing to score a partial test set")
    hyps = detokenise(task, pieces)
    os.makedirs(task.results_dir, exist_ok=True)
    write_lines(os.path.join(task.results_dir, f"{system}.hyp"), hyps)
    with open(os.path.join(task.results_dir, f"{system}.generate.log"), "w", encoding="utf-8") as f:
        f.write(generate_log)
    scores = score(task, hyps, refs)
    test = task["data"].get("sacrebleu") or {}
    result = {
        "task": task.name,
        "system": system,
        "label": LABELS[system],
        "quick": task.quick,
        "test_set": test.get("test_set", "local"),
        "langpair": test.get("langpair", f"{task.src}-{task.tgt}"),
        "sentences": len(hyps),
        **scores,
        "checkpoint": os.path.basename(checkpoint),  # the one decoded (an average of the ones below)
        "checkpoints": [os.path.basename(p) for p in inputs],
        "generation": {"beam": settings.get("beam", 4), "lenpen": settings.get("lenpen", 1.0)},
        "versions": {"fairseq": fairseq.__version__, "torch": torch.__version__, "sacrebleu": sacrebleu.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = task.result_path(system)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    where = f"{result['test_set']} -l {result['langpair']}" if test else "the local test set"
    print(f"{task.name} {LABELS[system]} on {where} ({len(hyps)} sentences):")
    print("  " + scores["sacrebleu"]["text"])
    print("  " + scores["chrf"]["text"])
    if "tokenized_bleu" in scores:
        print(f"  {scores['tokenized_bleu']['score']}  ({scores['tokenized_bleu']['label']})")
    print(f"  result: {path}")
    return result
