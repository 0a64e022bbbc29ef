"""prepare: download, extract, normalise, sentencepiece, encode, clean and binarise one task.

Each step records what it was made from: a fingerprint of its own settings and of the step before it (``steps/<step>
.done``, JSON). A step whose fingerprint still matches is skipped; one whose settings changed (a new sentencepiece
vocabulary size, other cleaning thresholds, another corpus) is run again, and so is every step after it, and the log
says which setting changed. Every output is written under a temporary name and renamed, so a re-run after an
interruption redoes the step that was cut short and no half-written file ever looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
from typing import Any, Callable, cast

from tqdm import tqdm

from ..files import atomic_open, atomic_path, exclusive_lock, read_json, write_json
from .config import Task, item_download
from .corpora import NORMALISATION_VERSION, CorpusError, extract_members, normalise, read_parallel
from .download import fetch, local_name
from .fairseq_tool import command as fairseq_command
from .fairseq_tool import dies_with_this_process
from .records import describe_changes

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


class Steps:
    """Runs a chain of steps, skipping those whose recorded fingerprint matches (see the module's docstring)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.previous = ""  # the fingerprint of the step before: a change there re-runs this one too
        self.rerun_from: str | None = None  # the first step of this run that was (re-)run
        os.makedirs(directory, exist_ok=True)

    def marker(self, step: str) -> str:
        return os.path.join(self.directory, f"{step}.done")

    def run(self, step: str, fn: Callable[[], Any], settings: dict) -> None:
        settings = json.loads(json.dumps(settings))  # plain JSON values, as they will be recorded
        fingerprint = hashlib.sha256(json.dumps({"step": step, "settings": settings, "after": self.previous},
                                                sort_keys=True).encode()).hexdigest()
        self.previous = fingerprint
        recorded = self._recorded(step)
        # a step after one that ran again runs again too, even with its record intact: the step before may have
        # written other files from the same settings (its record had been lost to an interruption)
        if recorded is not None and recorded.get("fingerprint") == fingerprint and not self.rerun_from:
            logger.info(f"[{step}] already done")
            return
        if recorded is not None:
            changes = describe_changes(recorded.get("settings"), settings)
            if changes:
                reason = f"settings changed since the last run ({changes})"
            elif self.rerun_from:
                reason = f"[{self.rerun_from}], which it is made from, was run again"
            else:
                reason = "its inputs changed"
            logger.warning(f"[{step}] running again: {reason}")
        if os.path.exists(self.marker(step)):
            os.remove(self.marker(step))
        logger.info(f"[{step}] ...")
        fn()
        write_json(self.marker(step), {"fingerprint": fingerprint, "settings": settings})
        self.rerun_from = self.rerun_from or step
        logger.info(f"[{step}] done")

    def fingerprint(self) -> str:
        """The fingerprint of the last step run or checked: what the prepared data was made from."""
        return self.previous

    def _recorded(self, step: str) -> dict | None:
        path = self.marker(step)
        if not os.path.exists(path):
            return None
        try:
            recorded = read_json(path)
        except (ValueError, OSError):
            recorded = None
        return recorded if isinstance(recorded, dict) else {"settings": None}  # an older marker: no record


def prepare(task: Task, mirror: str | None = None, workers: int | None = None) -> str:
    """Prepare ``task``'s data; returns the fingerprint of what was prepared (recorded by training). One pipeline at a
    time prepares a task's data (two tuning lanes started together): the others wait, then find the steps done."""
    with exclusive_lock(task.path("prepare.lock"), lambda holder: logger.info(
            f"{task.name}: another pipeline (process {holder}) is preparing this data; waiting for it")):
        return _prepare(task, mirror, workers)


def _prepare(task: Task, mirror: str | None, workers: int | None) -> str:
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    steps = Steps(task.path("steps"))
    data = task["data"]
    if data.get("generator"):
        steps.run("generate", lambda: _generate(task),
                  {key: data.get(key) for key in ("generator", "sizes", "seed")})
    else:
        downloads = {name: {k: v for k, v in entry.items() if k in ("url", "urls", "md5", "sha256", "file")}
                     for name, entry in data["downloads"].items()}
        steps.run("download", lambda: [fetch(entry, task.path("downloads"), mirror)
                                       for entry in data["downloads"].values()], downloads)
        steps.run("extract", lambda: _extract(task),
                  {"splits": {split: data[split] for split in SPLITS},
                   "max_train_sentences": data.get("max_train_sentences"),
                   "max_test_sentences": data.get("max_test_sentences"), "normalisation": NORMALISATION_VERSION,
                   # only where set: data prepared before the key existed keeps its fingerprint
                   **({"max_valid_sentences": data["max_valid_sentences"]} if data.get("max_valid_sentences") else {})})
    steps.run("sentencepiece", lambda: _train_sentencepiece(task, workers), task["sentencepiece"])
    steps.run("encode", lambda: _encode(task, workers), task.get("clean") or {})
    steps.run("binarize", lambda: _binarize(task, workers), {"tool": "fairseq-preprocess"})
    write_json(task.path("fingerprint.json"), {"fingerprint": steps.fingerprint()})
    logger.info(f"{task.name}: data ready in {task.bin_dir}")
    return steps.fingerprint()


def _generate(task: Task) -> None:
    """The bundled toy task: generated offline, with gold alignments for the test set."""
    from ..toy import write_task

    spec = task["data"]
    if spec["generator"] != "toy":
        raise CorpusError(f"unknown data generator {spec['generator']!r}; the only one is 'toy'")
    raw = task.path("raw")
    write_task(raw, spec.get("sizes"), seed=spec.get("seed", 1), src=task.src, tgt=task.tgt)
    shutil.copyfile(os.path.join(raw, f"test.{task.tgt}"), os.path.join(raw, "test.ref"))


def _extract(task: Task) -> None:
    data = task["data"]
    downloads = {name: os.path.join(task.path("downloads"), local_name(entry))
                 for name, entry in data["downloads"].items()}
    members: dict[str, set[str]] = {}
    for split in SPLITS:
        for item in data[split]:
            for side in ("src", "tgt"):
                if item.get(side):
                    members.setdefault(cast(str, item_download(item, side)), set()).add(item[side])
    for name, wanted in members.items():
        logger.info(f"extracting {len(wanted)} file(s) from {os.path.basename(downloads[name])}")
        extract_members(downloads[name], wanted, task.path("extracted", name))

    def side_path(item: dict, side: str) -> str:
        download, member = cast(str, item_download(item, side)), item.get(side)
        return os.path.join(task.path("extracted", download), member) if member else downloads[download]

    limits = {"train": data.get("max_train_sentences"), "valid": data.get("max_valid_sentences"),
              "test": data.get("max_test_sentences")}
    for split in SPLITS:
        limit = limits.get(split)
        names = [f"{split}.{task.src}", f"{split}.{task.tgt}"] + (["test.ref"] if split == "test" else [])
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(atomic_open(task.path("raw", name))) for name in names]
            written = 0
            for item in data[split]:
                pairs = read_parallel(side_path(item, "src"), side_path(item, "tgt"), item)
                if limit:
                    pairs = itertools.islice(pairs, max(0, limit - written))
                n = 0
                label = item_download(item, "src")
                for src, tgt in tqdm(pairs, desc=f"{split}: {label}", unit=" pairs", mininterval=5,
                                     disable=split != "train"):
                    files[0].write(normalise(src) + "\n")
                    files[1].write(normalise(tgt) + "\n")
                    if split == "test":  # the reference exactly as distributed (as sacrebleu reads it), for scoring
                        files[2].write(tgt + "\n")
                    n += 1
                written += n
                logger.info(f"{split}: {n} sentence pairs from {label} ({item.get('src') or 'the file itself'})")


SAMPLE_SEED = 1


def sentencepiece_sample(inputs: list[str], size: int, path: str) -> list[str]:
    """The files sentencepiece learns from: ``inputs`` whole when they hold at most ``size`` lines, else ``size`` of
    their lines drawn with a fixed seed, written to ``path``. sentencepiece's own sampling (``input_sentence_size``)
    draws differently in every process, even after ``set_random_generator_seed`` (0.2.3), so two preparations of a
    large corpus (WMT14 En-Fr, WMT18 Zh-En) would get two vocabularies from the same settings."""
    import numpy as np

    counts = []
    for name in inputs:
        with open(name, "rb") as f:
            counts.append(sum(1 for _ in f))
    total = sum(counts)
    if not size or total <= size:
        return inputs
    chosen = np.zeros(total, dtype=np.uint8)
    chosen[np.random.default_rng(SAMPLE_SEED).choice(total, size=size, replace=False)] = 1
    logger.info(f"sentencepiece learns from {size} of the {total} training lines, drawn with seed {SAMPLE_SEED}")
    with atomic_open(path, "wb") as out:
        start = 0
        for name, count in zip(inputs, counts):
            with open(name, "rb") as f:  # itertools.compress keeps the loop over tens of millions of lines in C
                out.writelines(itertools.compress(f, chosen[start:start + count].tobytes()))
            start += count
    return [path]


def _train_sentencepiece(task: Task, workers: int) -> None:
    import sentencepiece as spm

    settings = dict(task["sentencepiece"])
    out = task.path("spm")
    os.makedirs(out, exist_ok=True)
    size = settings.pop("input_sentence_size", 10_000_000)
    sample = os.path.join(out, "sample.txt")
    inputs = sentencepiece_sample([task.path("raw", f"train.{lang}") for lang in (task.src, task.tgt)], size, sample)
    prefix = os.path.join(out, "spm.tmp")
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(inputs),
            model_prefix=prefix,
            vocab_size=settings.pop("vocab_size"),
            model_type=settings.pop("model_type", "bpe"),
            character_coverage=settings.pop("character_coverage", 1.0),
            input_sentence_size=size,  # a sample holds exactly that many: sentencepiece draws nothing itself
            shuffle_input_sentence=True,
            num_threads=workers,
            bos_id=-1,  # fairseq adds its own <s>, </s>, <pad>, <unk> in the dictionary
            eos_id=-1,
            hard_vocab_limit=False,  # a tiny corpus (QUICK=1) may not fill the vocabulary; real ones do
            minloglevel=2,
            **settings,
        )
    finally:
        if os.path.exists(sample):
            os.remove(sample)  # up to 10M lines, read once
    for ext in ("model", "vocab"):
        os.replace(f"{prefix}.{ext}", os.path.join(out, f"spm.{ext}"))


def _encode(task: Task, workers: int, chunk: int = 100_000) -> None:
    """Sentencepiece pieces of every split, in chunks (memory stays flat on corpora of tens of millions of lines);
    training and validation pairs that are empty, too long or too unequal are dropped, the test set never."""
    import sentencepiece as spm

    model = spm.SentencePieceProcessor(model_file=task.path("spm", "spm.model"))
    clean = task.get("clean") or {}
    max_tokens, max_ratio = clean.get("max_tokens", 250), clean.get("max_ratio", 1.5)
    for split in SPLITS:
        kept = total = 0
        with open(task.path("raw", f"{split}.{task.src}"), encoding="utf-8", newline="\n") as fs, \
                open(task.path("raw", f"{split}.{task.tgt}"), encoding="utf-8", newline="\n") as ft, \
                atomic_open(task.path("spm", f"{split}.{task.src}")) as out_src, \
                atomic_open(task.path("spm", f"{split}.{task.tgt}")) as out_tgt:
            while True:
                src = [line.rstrip("\n") for line in itertools.islice(fs, chunk)]
                tgt = [line.rstrip("\n") for line in itertools.islice(ft, chunk)]
                if not src and not tgt:
                    break
                total += len(src)
                pieces = zip(model.encode(src, out_type=str, num_threads=workers),
                             model.encode(tgt, out_type=str, num_threads=workers))
                for s_pieces, t_pieces in pieces:
                    if split != "test" and not _keep(len(s_pieces), len(t_pieces), max_tokens, max_ratio):
                        continue
                    out_src.write(" ".join(s_pieces) + "\n")
                    out_tgt.write(" ".join(t_pieces) + "\n")
                    kept += 1
        if split != "test":
            logger.info(f"{split}: kept {kept} of {total} pairs (1-{max_tokens} pieces, ratio <= {max_ratio})")


def _keep(n: int, m: int, max_tokens: int, max_ratio: float) -> bool:
    return 0 < n <= max_tokens and 0 < m <= max_tokens and max(n, m) <= max_ratio * min(n, m)


def _binarize(task: Task, workers: int) -> None:
    prefix = task.path("spm")
    with atomic_path(task.bin_dir) as tmp:
        subprocess.run([*fairseq_command("fairseq-preprocess"), "--source-lang", task.src, "--target-lang", task.tgt,
                        "--trainpref", os.path.join(prefix, "train"), "--validpref", os.path.join(prefix, "valid"),
                        "--testpref", os.path.join(prefix, "test"), "--destdir", tmp, "--workers", str(workers)],
                       check=True, preexec_fn=dies_with_this_process())
        shutil.copyfile(task.path("spm", "spm.model"), os.path.join(tmp, "spm.model"))  # for hub loading
