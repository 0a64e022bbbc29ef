"""prepare: download, extract, normalise, sentencepiece, encode, clean and binarise one task.

Each step leaves a marker (``steps/<step>.done``) once all its outputs are complete; every output is written under a
temporary name and renamed. A re-run after an interruption therefore skips finished steps and redoes the one that was
cut short, and no half-written file ever looks complete.
"""

import logging
import os
import shutil
import subprocess
import sys

from tqdm import tqdm

from .corpora import CorpusError, extract_members, normalise, read_parallel
from .download import fetch

logger = logging.getLogger("rela_fairseq.pipeline")
SPLITS = ("train", "valid", "test")


class Steps:
    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def done(self, step):
        return os.path.exists(os.path.join(self.directory, f"{step}.done"))

    def run(self, step, fn):
        if self.done(step):
            logger.info(f"[{step}] already done")
            return
        logger.info(f"[{step}] ...")
        fn()
        with open(os.path.join(self.directory, f"{step}.done"), "w") as f:
            f.write("ok\n")
        logger.info(f"[{step}] done")


def write_lines(path, lines):
    """Write all lines, then rename: the file under its final name is always complete."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def read_lines(path):
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def prepare(task, mirror=None, workers=None):
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    steps = Steps(task.path("steps"))
    data = task["data"]
    if data.get("generator"):
        steps.run("generate", lambda: _generate(task))
    else:
        steps.run("download", lambda: [fetch(entry, task.path("downloads"), mirror)
                                       for entry in data["downloads"].values()])
        steps.run("extract", lambda: _extract(task))
    steps.run("sentencepiece", lambda: _train_sentencepiece(task, workers))
    steps.run("encode", lambda: _encode(task, workers))
    steps.run("binarize", lambda: _binarize(task, workers))
    logger.info(f"{task.name}: data ready in {task.bin_dir}")


def _generate(task):
    """The bundled toy task: generated offline, with gold alignments for the test set."""
    from ..toy import write_task

    spec = task["data"]
    if spec["generator"] != "toy":
        raise CorpusError(f"unknown data generator {spec['generator']!r}; the only one is 'toy'")
    raw = task.path("raw")
    write_task(raw, spec.get("sizes"), seed=spec.get("seed", 1), src=task.src, tgt=task.tgt)
    shutil.copyfile(os.path.join(raw, f"test.{task.tgt}"), os.path.join(raw, "test.ref"))


def _extract(task):
    data = task["data"]
    downloads = {name: os.path.join(task.path("downloads"), _file_name(entry))
                 for name, entry in data["downloads"].items()}
    members = {}
    for split in SPLITS:
        for item in data[split]:
            if item.get("download") not in downloads:
                raise CorpusError(f"{split} item {item} names download {item.get('download')!r}; the config "
                                  f"defines {', '.join(downloads)}")
            for side in ("src", "tgt"):
                if item.get(side):
                    members.setdefault(item["download"], set()).add(item[side])
    for name, wanted in members.items():
        out = task.path("extracted", name)
        if not os.path.isdir(out):
            logger.info(f"extracting {len(wanted)} file(s) from {os.path.basename(downloads[name])}")
            extract_members(downloads[name], wanted, out)

    def side_path(item, side):
        member = item.get(side)
        return os.path.join(task.path("extracted", item["download"]), member) if member else downloads[item["download"]]

    limit = data.get("max_train_sentences")
    for split in SPLITS:
        src_lines, tgt_lines = [], []
        for item in data[split]:
            src, tgt = read_parallel(side_path(item, "src"), side_path(item, "tgt"), item)
            logger.info(f"{split}: {len(src)} sentence pairs from {item['download']} ({item.get('src')})")
            src_lines += src
            tgt_lines += tgt
        if split == "train" and limit:
            src_lines, tgt_lines = src_lines[:limit], tgt_lines[:limit]
        if split == "test":  # the reference exactly as distributed (and as sacrebleu reads it), for scoring
            write_lines(task.path("raw", "test.ref"), tgt_lines)
        write_lines(task.path("raw", f"{split}.{task.src}"),
                    (normalise(x) for x in tqdm(src_lines, desc=f"normalise {split}.{task.src}", unit=" lines",
                                                mininterval=5, disable=len(src_lines) < 100000)))
        write_lines(task.path("raw", f"{split}.{task.tgt}"), (normalise(x) for x in tgt_lines))


def _file_name(entry):
    import urllib.parse

    urls = entry.get("urls") or [entry["url"]]
    name = entry.get("file") or os.path.basename(urllib.parse.urlparse(urls[0]).path)
    return name.rsplit(".", 1)[0] if len(urls) > 1 and not entry.get("file") else name


def _train_sentencepiece(task, workers):
    import sentencepiece as spm

    settings = dict(task["sentencepiece"])
    out = task.path("spm")
    os.makedirs(out, exist_ok=True)
    inputs = [task.path("raw", f"train.{lang}") for lang in (task.src, task.tgt)]
    prefix = os.path.join(out, "spm.tmp")
    spm.SentencePieceTrainer.train(
        input=",".join(inputs),
        model_prefix=prefix,
        vocab_size=settings.pop("vocab_size"),
        model_type=settings.pop("model_type", "bpe"),
        character_coverage=settings.pop("character_coverage", 1.0),
        input_sentence_size=settings.pop("input_sentence_size", 10_000_000),
        shuffle_input_sentence=True,
        num_threads=workers,
        bos_id=-1,  # fairseq adds its own <s>, </s>, <pad>, <unk> in the dictionary
        eos_id=-1,
        hard_vocab_limit=False,  # a tiny corpus (QUICK=1) may not fill the vocabulary; real ones do
        minloglevel=2,
        **settings,
    )
    for ext in ("model", "vocab"):
        os.replace(f"{prefix}.{ext}", os.path.join(out, f"spm.{ext}"))


def _encode(task, workers):
    import sentencepiece as spm

    model = spm.SentencePieceProcessor(model_file=task.path("spm", "spm.model"))
    clean = task.get("clean") or {}
    max_tokens, max_ratio = clean.get("max_tokens", 250), clean.get("max_ratio", 1.5)
    for split in SPLITS:
        encoded = {}
        for lang in (task.src, task.tgt):
            lines = read_lines(task.path("raw", f"{split}.{lang}"))
            encoded[lang] = [" ".join(p) for p in model.encode(lines, out_type=str, num_threads=workers)]
        pairs = list(zip(encoded[task.src], encoded[task.tgt]))
        if split != "test":  # the test set is never filtered
            kept = [(s, t) for s, t in pairs if _keep(s, t, max_tokens, max_ratio)]
            logger.info(f"{split}: kept {len(kept)} of {len(pairs)} pairs (1-{max_tokens} pieces, ratio <= {max_ratio})")
            pairs = kept
        write_lines(task.path("spm", f"{split}.{task.src}"), (s for s, _ in pairs))
        write_lines(task.path("spm", f"{split}.{task.tgt}"), (t for _, t in pairs))


def _keep(src, tgt, max_tokens, max_ratio):
    n, m = len(src.split()), len(tgt.split())
    return 0 < n <= max_tokens and 0 < m <= max_tokens and max(n, m) <= max_ratio * min(n, m)


def _binarize(task, workers):
    tmp = task.bin_dir + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    prefix = task.path("spm")
    subprocess.run([tool("fairseq-preprocess"), "--source-lang", task.src, "--target-lang", task.tgt,
                    "--trainpref", os.path.join(prefix, "train"), "--validpref", os.path.join(prefix, "valid"),
                    "--testpref", os.path.join(prefix, "test"), "--destdir", tmp, "--workers", str(workers)],
                   check=True)
    shutil.copyfile(task.path("spm", "spm.model"), os.path.join(tmp, "spm.model"))  # for hub loading
    if os.path.exists(task.bin_dir):
        shutil.rmtree(task.bin_dir)
    os.replace(tmp, task.bin_dir)


def tool(name):
    """A console script installed beside this Python (fairseq-train, ...)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name
