"""prepare: download, extract, normalise, sentencepiece, encode, clean and binarise one task.

Each step leaves a marker (``steps/<step>.done``) once all its outputs are complete; every output is written under a
temporary name and renamed. A re-run after an interruption therefore skips finished steps and redoes the one that was
cut short, and no half-written file ever looks complete.
"""

import contextlib
import itertools
import logging
import os
import shutil
import subprocess
import sys

from tqdm import tqdm

from .corpora import CorpusError, extract_members, normalise, read_parallel
from .download import fetch, local_name

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


@contextlib.contextmanager
def atomic_open(path):
    """A file written under ``path.tmp`` and renamed to ``path`` only when the block completes: the file under its
    final name is always complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_lines(path, lines):
    with atomic_open(path) as f:
        for line in lines:
            f.write(line + "\n")


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
    downloads = {name: os.path.join(task.path("downloads"), local_name(entry))
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
        names = [f"{split}.{task.src}", f"{split}.{task.tgt}"] + (["test.ref"] if split == "test" else [])
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(atomic_open(task.path("raw", name))) for name in names]
            written = 0
            for item in data[split]:
                pairs = read_parallel(side_path(item, "src"), side_path(item, "tgt"), item)
                if split == "train" and limit:
                    pairs = itertools.islice(pairs, max(0, limit - written))
                n = 0
                for src, tgt in tqdm(pairs, desc=f"{split}: {item['download']}", unit=" pairs", mininterval=5,
                                     disable=split != "train"):
                    files[0].write(normalise(src) + "\n")
                    files[1].write(normalise(tgt) + "\n")
                    if split == "test":  # the reference exactly as distributed (as sacrebleu reads it), for scoring
                        files[2].write(tgt + "\n")
                    n += 1
                written += n
                logger.info(f"{split}: {n} sentence pairs from {item['download']} ({item.get('src')})")


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


def _encode(task, workers, chunk=100_000):
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


def _keep(n, m, max_tokens, max_ratio):
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
