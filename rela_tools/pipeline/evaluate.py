"""evaluate: average the last checkpoints, decode the test set, detokenise, score with SacreBLEU (and chrF).

The reference is the official test set exactly as distributed (``raw/test.ref``, the same text ``sacrebleu -t`` reads),
so the score equals ``sacrebleu -t <test set> -l <pair>`` on the same output, offline. For WMT14 En-De the tokenised,
compound-split BLEU of older papers is added, labelled as such. One JSON result per task and system.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re

from ..averaging import average_checkpoints, newest_checkpoints, save_atomically
from ..errors import RelaFairseqError
from ..files import read_json, read_lines, write_json, write_lines
from ..systems import LABELS
from .commands import generate_command, generation_speed, length_limits, run_fairseq
from .config import Setting, Task
from .records import (
    RUN_RECORD,
    ResultRecord,
    check_data_unchanged,
    repair_interrupted_copies,
    result_path,
    reusable_result,
)
from .runtime import hardware
from .train import run_lock

logger = logging.getLogger(__name__)


def decode(task: Task, checkpoint: str, settings: dict, hw, split: str = "test") -> tuple[list[str], str]:
    """Hypotheses (sentencepiece pieces) of ``split`` (test or valid), in its order, and fairseq-generate's output."""
    cmd = generate_command(task, checkpoint, hw, settings["beam"], settings["lenpen"], "--max-tokens",
                           str(settings["max_tokens"]), *length_limits(settings), subset=split)
    logger.info("running: " + " ".join(cmd))
    out = run_fairseq(cmd, "fairseq-generate")
    hyps = {}
    for line in out.stdout.splitlines():
        if line.startswith("H-"):
            head, _score, text = line.split("\t", 2)
            hyps[int(head[2:])] = text
    return [hyps[i] for i in sorted(hyps)], out.stdout


def detokenise(task, pieces_lines):
    import sentencepiece as spm

    # the binarised data's own copy: spm/spm.model is replaced first when the data is prepared again
    model_file = os.path.join(task.bin_dir, "spm.model")
    if not os.path.exists(model_file):  # prepared before the copy existed
        model_file = task.path("spm", "spm.model")
    model = spm.SentencePieceProcessor(model_file=model_file)
    return [model.decode_pieces(line.split()) for line in pieces_lines]


def tokenized_compound_split(lines, lang):
    """Moses tokenisation, then every hyphen between two non-spaces becomes " ##AT##-##AT## " (tensor2tensor's
    get_ende_bleu.sh, fairseq's compound_split_bleu.sh)."""
    from sacremoses import MosesTokenizer

    tokenizer = MosesTokenizer(lang=lang)
    return [re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", tokenizer.tokenize(line, return_str=True, escape=True))
            for line in lines]


def score(task, hyps, refs, settings: dict | None = None):
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    result = {
        "sacrebleu": {"score": round(bleu_score.score, 2), "signature": str(bleu.get_signature()),
                      "text": bleu_score.format(signature=str(bleu.get_signature()))},
        "chrf": {"score": round(chrf_score.score, 2), "signature": str(chrf.get_signature()),
                 "text": chrf_score.format(signature=str(chrf.get_signature()))},
    }
    if (settings or task["evaluate"]).get("tokenized_bleu"):
        tok = BLEU(tokenize="none", force=True)
        tok_score = tok.corpus_score(tokenized_compound_split(hyps, task.tgt),
                                     [tokenized_compound_split(refs, task.tgt)])
        result["tokenized_bleu"] = {
            "score": round(tok_score.score, 2),
            "label": "tokenised BLEU: Moses tokeniser + compound splitting (multi-bleu.perl style); "
                     "NOT comparable with SacreBLEU",
        }
    return result


def checkpoints_to_average(checkpoint_dir: str, n: int, interval: int | None) -> list[str]:
    """The last ``n`` states saved every ``interval`` updates, as the authors' toolkit averages the last 5 of its
    saves every 5,000 steps (bzhangGo/zero main.py L351-352, scripts/checkpoint_averaging.py). fairseq also saves at
    every epoch's end: with epochs shorter than the interval, the newest n states of any kind would span a fraction of
    the window (WMT16 Ro-En: about 3K updates instead of 20K). Without such states (a run shorter than one interval,
    or none set), the newest states of any kind."""
    if interval:
        try:
            return newest_checkpoints(checkpoint_dir, n, at_least=1, every=interval)
        except RelaFairseqError:
            logger.warning(f"no checkpoint in {checkpoint_dir} was saved at a multiple of {interval} updates "
                           "(save_interval_updates): averaging the newest checkpoints of any kind")
    return newest_checkpoints(checkpoint_dir, n, at_least=1)


def references(task: Task, split: str) -> list[str]:
    """The references of ``split``: the test set exactly as distributed (raw/test.ref); for the validation set its
    normalised text (raw/valid.<tgt>) where cleaning kept every pair, else the cleaned pairs' target pieces,
    detokenised, so that they stay in line with the binarised set."""
    if split == "test":
        return read_lines(task.path("raw", "test.ref"))
    raw = read_lines(task.path("raw", f"valid.{task.tgt}"))
    pieces = read_lines(task.path("spm", f"valid.{task.tgt}"))
    return raw if len(raw) == len(pieces) else detokenise(task, pieces)


def averaged_checkpoint(task: Task, system: str, seed: int | None, setting: Setting) -> tuple[str, list[str]]:
    """The checkpoint a run is scored with (the average of its last ``average_last`` interval saves, written beside
    them) and the checkpoints averaged."""
    checkpoint_dir = task.checkpoint_dir(system, seed, setting)
    run = task.run_name(system, seed, setting)
    if not os.path.isdir(checkpoint_dir):
        raise RelaFairseqError(f"no checkpoints for {task.name}/{run} in {checkpoint_dir}: run "
                               f"scripts/train.sh {task.name} {system} first")
    run_record = os.path.join(checkpoint_dir, RUN_RECORD)
    if os.path.exists(run_record):  # decoding with other dictionaries would score nonsense, or fail only by luck
        check_data_unchanged(task, checkpoint_dir, read_json(run_record),
                             "prepare the data as it was to evaluate them, or train again")
    repair_interrupted_copies(checkpoint_dir)  # checkpoint_last.pt can be among the checkpoints averaged
    wanted = setting.evaluate["average_last"]
    inputs = checkpoints_to_average(checkpoint_dir, wanted, setting.train.get("save_interval_updates"))
    if len(inputs) < wanted:
        logger.warning(f"averaging {len(inputs)} checkpoint(s), fewer than the {wanted} the config asks for")
    if len(inputs) == 1:
        return inputs[0], inputs
    checkpoint = os.path.join(checkpoint_dir, f"checkpoint_avg{len(inputs)}.pt")
    logger.info(f"averaging {', '.join(os.path.basename(p) for p in inputs)}")
    save_atomically(average_checkpoints(inputs), checkpoint)
    return checkpoint, inputs


def translate_and_score(task: Task, checkpoint: str, settings: dict, split: str = "test") -> dict:
    """Decode ``split`` with ``checkpoint`` under the evaluate ``settings``, detokenise and score against its
    references: {"hyps", "scores", "generate_log"}."""
    pieces, generate_log = decode(task, checkpoint, settings, hardware(), split)
    refs = references(task, split)
    if len(pieces) != len(refs):
        raise RelaFairseqError(f"fairseq-generate translated {len(pieces)} sentences but the {split} set has "
                               f"{len(refs)}; refusing to score a partial {split} set")
    hyps = detokenise(task, pieces)
    return {"hyps": hyps, "scores": score(task, hyps, refs, settings), "generate_log": generate_log}


def evaluate(task: Task, system: str, seed: int | None = None, setting: Setting | None = None,
             split: str = "test") -> ResultRecord:
    """Score one run at ``setting`` (default: the system's own) on ``split``: the test set (the run's result JSON,
    hypotheses and fairseq-generate log in RESULTS_ROOT/<task>/) or the validation set (tune.sh's, in
    RESULTS_ROOT/<task>/tune/valid/, one per evaluate setting). A process training the run is waited for
    (``train.run_lock``): its checkpoints are not the finished run's."""
    setting = setting or task.setting(system)
    trained = os.path.isdir(task.checkpoint_dir(system, seed, setting))  # else its error, and no folder for a lock
    with run_lock(task, system, seed, setting) if trained else contextlib.nullcontext():
        return _evaluate(task, system, seed, setting, split)


def _evaluate(task: Task, system: str, seed: int | None, setting: Setting, split: str) -> ResultRecord:
    import fairseq
    import sacrebleu
    import torch

    settings = setting.evaluate
    run = task.run_name(system, seed, setting)
    checkpoint, inputs = averaged_checkpoint(task, system, seed, setting)
    translated = translate_and_score(task, checkpoint, settings, split)
    hyps, scores = translated["hyps"], translated["scores"]
    path = result_path(task, system, seed, setting, split)
    stem = path[:-len(".json")]
    write_lines(stem + ".hyp", hyps)
    write_lines(stem + ".generate.log", translated["generate_log"].splitlines())
    test = task["data"].get("sacrebleu") or {}
    result: ResultRecord = {
        "task": task.name,
        "system": system,
        "label": LABELS[system],
        "seed": seed if seed is not None else task["train"].get("seed", 1),
        "quick": task.quick,
        "split": split,
        "test_set": (test.get("test_set") or task["data"].get("test_name", "local")) if split == "test" else "valid",
        "langpair": test.get("langpair", f"{task.src}-{task.tgt}"),
        "sentences": len(hyps),
        **scores,
        "checkpoint": os.path.basename(checkpoint),  # the one decoded (an average of the ones below)
        "checkpoints": [os.path.basename(p) for p in inputs],
        "generation": {"beam": settings["beam"], "lenpen": settings["lenpen"]},
        "evaluate_settings": settings,  # all of them: compare reuses a result only under the same ones
        "setting": {"overrides": setting.overrides, "source": setting.source, "run": run},
        "generate_speed": generation_speed(translated["generate_log"]),
        "versions": {"fairseq": fairseq.__version__, "torch": torch.__version__, "sacrebleu": sacrebleu.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(path, result)
    if split != "test":
        logger.info(f"{run} on the validation set ({setting.describe()}): {scores['sacrebleu']['text']}")
        return result
    where = f"{result['test_set']} -l {result['langpair']}" if test else "the local test set"
    print(f"{task.name} {LABELS[system]}{'' if run == system else f' ({run})'} on {where} ({len(hyps)} sentences):")
    print("  " + scores["sacrebleu"]["text"])
    print("  " + scores["chrf"]["text"])
    if "tokenized_bleu" in scores:
        print(f"  {scores['tokenized_bleu']['score']}  ({scores['tokenized_bleu']['label']})")
    print(f"  result: {path}")
    return result


def evaluate_if_needed(task: Task, system: str, seed: int, setting: Setting, force: bool = False,
                       split: str = "test") -> ResultRecord:
    """The run's result on ``split``: the stored one where ``records.reusable_result`` allows (``force``: the run was
    just trained), else a new one."""
    previous = reusable_result(task, system, seed, setting, split, force)
    if previous is not None:
        logger.info(f"{task.run_name(system, seed, setting)}: evaluated already on {split}, reusing "
                    f"{result_path(task, system, seed, setting, split)}")
        return previous
    return evaluate(task, system, seed=seed, setting=setting, split=split)
