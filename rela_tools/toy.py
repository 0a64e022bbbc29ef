"""A small synthetic translation task with gold word alignments, generated offline and deterministically.

The source side is English-like (SVO, determiners, prepositions, adjectives before nouns); the target side is a
made-up SOV language that makes a translation model learn what real pairs need:

* reordering: the verb moves to the end, adjectives follow their noun, prepositions become postpositions;
* one-to-many: a plural noun becomes noun + plural marker, a verb becomes stem + tense marker;
* unaligned words: source determiners have no translation; target case particles have no source word (they get a
  *possible* link to their noun, the usual convention for function words).

Gold alignments are written in the standard format (``i-j`` sure, ``ipj`` possible, source index first, 1-based), so
AER on this task is exact. ``python -m rela_tools.toy OUT_DIR`` writes ``{train,valid,test}.{src,tgt,align}``.
"""

import argparse
import os
import random

NOUNS = ("cat dog bird horse teacher farmer child doctor king queen student baker fox wolf mouse sailor painter "
         "singer river garden house tree apple letter book song boat lamp stone bridge village").split()
ADJECTIVES = "big small old young red green happy quiet brave tired clever strange".split()
VERBS = "sees likes finds helps follows calls paints carries reads watches builds visits".split()
ADVERBS = "quickly slowly often rarely gladly".split()
PREPOSITIONS = "near behind under with".split()
DETERMINERS = {False: ("the", "a", "this", "every"), True: ("the", "these", "some", "all")}  # by plural
TENSES = ("now", "yesterday")  # source time words; the target marks tense on the verb instead

SUBJECT, OBJECT = "ga", "o"  # target case particles: no source counterpart
PLURAL = "ra"  # target plural marker
TENSE_MARKERS = {"now": "mu", "yesterday": "ta"}


def target_lexicon(seed=0):
    """A made-up word for every source content word (two or three CV syllables, all distinct)."""
    rng = random.Random(f"toy-lexicon-{seed}")
    consonants, vowels = "bdfgklmnpstvz", "aeiou"
    reserved = {SUBJECT, OBJECT, PLURAL, *TENSE_MARKERS.values()}
    lexicon, used = {}, set(reserved)
    for word in (*NOUNS, *ADJECTIVES, *VERBS, *ADVERBS, *PREPOSITIONS):
        while True:
            candidate = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.choice((2, 3))))
            if candidate not in used:
                break
        used.add(candidate)
        lexicon[word] = candidate
    return lexicon


class _Pair:
    """A sentence pair under construction: tokens on both sides and the links between them (0-based)."""

    def __init__(self):
        self.src, self.tgt, self.sure, self.possible = [], [], set(), set()

    def add_src(self, word):
        self.src.append(word)
        return len(self.src) - 1

    def add_tgt(self, word, sure=(), possible=()):
        j = len(self.tgt)
        self.tgt.append(word)
        self.sure.update((i, j) for i in sure)
        self.possible.update((i, j) for i in possible)
        return j


def _noun_phrase(rng):
    plural = rng.random() < 0.3
    return {
        "det": rng.choice(DETERMINERS[plural]),
        "adj": rng.choice(ADJECTIVES) if rng.random() < 0.5 else None,
        "noun": rng.choice(NOUNS),
        "plural": plural,
    }


def _source_np(pair, np):
    positions = {"det": pair.add_src(np["det"])}
    if np["adj"]:
        positions["adj"] = pair.add_src(np["adj"])
    positions["noun"] = pair.add_src(np["noun"] + ("s" if np["plural"] else ""))
    return positions


def _target_np(pair, np, positions, lexicon, particle=None):
    noun = positions["noun"]
    pair.add_tgt(lexicon[np["noun"]], sure=[noun])
    if np["plural"]:
        pair.add_tgt(PLURAL, sure=[noun])  # one-to-many: "cats" -> "neko ra"
    if np["adj"]:
        pair.add_tgt(lexicon[np["adj"]], sure=[positions["adj"]])  # adjective after the noun
    if particle:
        pair.add_tgt(particle, possible=[noun])  # unaligned function word: possible link only
    # the determiner stays unaligned


def make_pair(rng, lexicon):
    """One sentence pair:
    [time] NP_subj verb NP_obj [adverb] [prep NP]  ->  [NP PP] NP_subj-ga NP_obj-o [adv] verb-tense."""
    subj, obj = _noun_phrase(rng), _noun_phrase(rng)
    verb = rng.choice(VERBS)
    adverb = rng.choice(ADVERBS) if rng.random() < 0.4 else None
    prep = (rng.choice(PREPOSITIONS), _noun_phrase(rng)) if rng.random() < 0.4 else None
    tense = rng.choice(TENSES)

    pair = _Pair()
    tense_pos = pair.add_src(tense)
    subj_pos = _source_np(pair, subj)
    verb_pos = pair.add_src(verb)
    obj_pos = _source_np(pair, obj)
    adverb_pos = pair.add_src(adverb) if adverb else None
    if prep:
        prep_pos = pair.add_src(prep[0])
        prep_np_pos = _source_np(pair, prep[1])

    if prep:  # the prepositional phrase moves to the front, with a postposition
        _target_np(pair, prep[1], prep_np_pos, lexicon)
        pair.add_tgt(lexicon[prep[0]], sure=[prep_pos])
    _target_np(pair, subj, subj_pos, lexicon, particle=SUBJECT)
    _target_np(pair, obj, obj_pos, lexicon, particle=OBJECT)
    if adverb:
        pair.add_tgt(lexicon[adverb], sure=[adverb_pos])
    pair.add_tgt(lexicon[verb], sure=[verb_pos])
    pair.add_tgt(TENSE_MARKERS[tense], sure=[verb_pos, tense_pos])  # verb + tense word -> one marker
    return pair


def gold_links_text(pair, index_base=1):
    """Gold links in the standard text format: ``i-j`` sure, ``ipj`` possible, source index first."""
    links = [(i, j, "-") for i, j in pair.sure] + [(i, j, "p") for i, j in pair.possible - pair.sure]
    return " ".join(f"{i + index_base}{sep}{j + index_base}" for i, j, sep in sorted(links))


SPLITS = {"train": 4000, "valid": 300, "test": 300}


def generate(sizes=None, seed=1):
    """{split: [pair, ...]} with no sentence pair of valid/test also in train."""
    sizes = dict(SPLITS, **(sizes or {}))
    lexicon = target_lexicon()
    rng = random.Random(f"toy-corpus-{seed}")
    seen, corpus = set(), {}
    for split in ("test", "valid", "train"):  # held-out sets first, so that train avoids them
        pairs: list[_Pair] = []
        while len(pairs) < sizes[split]:
            pair = make_pair(rng, lexicon)
            key = " ".join(pair.src)
            if key in seen:
                continue
            seen.add(key)
            pairs.append(pair)
        corpus[split] = pairs
    return corpus


def write_task(out_dir, sizes=None, seed=1, src="src", tgt="tgt"):
    """Write {split}.{src,tgt,align}; the files are complete once this returns (written to .tmp, then renamed)."""
    os.makedirs(out_dir, exist_ok=True)
    corpus = generate(sizes, seed)
    for split, pairs in corpus.items():
        for suffix, lines in ((src, (" ".join(p.src) for p in pairs)), (tgt, (" ".join(p.tgt) for p in pairs)),
                              ("align", (gold_links_text(p) for p in pairs))):
            path = os.path.join(out_dir, f"{split}.{suffix}")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
            os.replace(path + ".tmp", path)
    return {split: len(pairs) for split, pairs in corpus.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rela_tools.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=1)
    for split, size in SPLITS.items():
        parser.add_argument(f"--{split}", type=int, default=size, help=f"sentence pairs in {split} (default {size})")
    args = parser.parse_args(argv)
    for split in SPLITS:
        if getattr(args, split) < 1:
            parser.error(f"--{split} must be at least 1, got {getattr(args, split)}")
    counts = write_task(args.out_dir, {s: getattr(args, s) for s in SPLITS}, seed=args.seed)
    print(" ".join(f"{split}={n}" for split, n in counts.items()), "sentence pairs written to", args.out_dir)


if __name__ == "__main__":
    main()
