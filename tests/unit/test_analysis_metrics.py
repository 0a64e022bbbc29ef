"""Attention metrics and alignment extraction on hand-built tensors with known answers."""

import math

import pytest
import torch

from rela_tools.analyze.align import (
    AlignmentCollector,
    SubwordTextError,
    detect_segmentation,
    hard_links,
    read_subword_text,
    to_words,
    word_index,
)
from rela_tools.analyze.forced import ForcedBatch, module_attention_type
from rela_tools.analyze.metrics import AttentionStats, js_per_query, valid_pairs


def summary_for(weights, pairs, kind="cross"):
    stats = AttentionStats()
    stats.add(kind, 0, weights, pairs)
    return stats.summary()["types"][kind]


def test_sparsity_and_null_rate_count_valid_pairs_only():
    # one sentence, 2 heads, 3 queries (the last is padding), 4 keys (the last is padding)
    w = torch.tensor([[[0.5, 0.0, 0.5, 9.0],
                       [0.0, 0.0, 0.0, 9.0],   # null row of head 0 (the padded key does not count)
                       [9.0, 9.0, 9.0, 9.0]],  # padded query: ignored
                      [[1.0, 1.0, 0.0, 0.0],
                       [0.2, 0.3, 0.5, 0.0],
                       [0.0, 0.0, 0.0, 0.0]]])[None]
    pairs = valid_pairs(torch.tensor([[True, True, False]]), torch.tensor([[True, True, True, False]]))
    s = summary_for(w, pairs)
    layer = s["layers"][0]
    # head 0: 6 valid pairs, zeros at (0,1), (1,0..2) -> 4; head 1: zeros at (0,2) -> 1
    assert layer["heads"][0]["sparsity"] == pytest.approx(4 / 6)
    assert layer["heads"][1]["sparsity"] == pytest.approx(1 / 6)
    assert layer["sparsity"] == pytest.approx(5 / 12)
    assert layer["heads"][0]["null_rate"] == pytest.approx(1 / 2)
    assert layer["heads"][1]["null_rate"] == 0
    assert s["overall"]["valid_pairs"] == 12


def test_row_mass_and_near_null_rate_count_valid_queries_and_keys_only():
    """The total weight per query row over its valid keys: a soft switch-off (sigmoid, softmax+null) shows as a
    near-null row (mass < NEAR_NULL_MASS), ReLA's exact one as a null row and a near-null one."""
    from rela_tools.analyze import MASS_BINS, NEAR_NULL_MASS

    w = torch.tensor([[[0.004, 0.003, 0.0, 9.0],  # 0.007 < 0.01: near-null, not null (the padded key ignored)
                       [0.0, 0.0, 0.0, 9.0],      # null: mass 0
                       [9.0, 9.0, 9.0, 9.0]],     # padded query: ignored
                      [[0.5, 0.2, 0.3, 0.0],      # 1.0
                       [0.3, 0.2, 0.1, 0.0],      # 0.6
                       [0.0, 0.0, 0.0, 0.0]]])[None]
    pairs = valid_pairs(torch.tensor([[True, True, False]]), torch.tensor([[True, True, True, False]]))
    s = summary_for(w, pairs)
    heads = s["layers"][0]["heads"]
    assert NEAR_NULL_MASS == 0.01
    assert heads[0]["near_null_rate"] == 1.0 and heads[0]["null_rate"] == 0.5
    assert heads[1]["near_null_rate"] == 0.0
    assert heads[0]["mass"] == pytest.approx(0.007 / 2) and heads[1]["mass"] == pytest.approx(0.8)
    assert s["overall"]["near_null_rate"] == 0.5 and s["overall"]["mass"] == pytest.approx(1.607 / 4)
    histogram = s["overall"]["mass_histogram"]
    assert histogram["edges"] == list(MASS_BINS)
    # 0 -> [0, 1e-3), 0.007 -> [1e-3, 1e-2), 0.6 -> [0.5, 1), 1.0 -> [1, 2)
    assert histogram["queries"] == [1, 1, 0, 0, 1, 1, 0]


def test_causal_mask_excludes_future_keys():
    pairs = valid_pairs(torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool), causal=True)
    assert pairs[0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    w = torch.tril(torch.ones(3, 3))[None, None]  # a softmax-like map: zero only in the masked future
    s = summary_for(w, pairs, "decoder")
    assert s["overall"]["sparsity"] == 0 and s["overall"]["null_rate"] == 0


def test_softmax_rows_give_sparsity_zero_and_null_rate_zero():
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(2, 4, 5, 6), -1)
    pairs = valid_pairs(torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool))
    s = summary_for(w, pairs)
    assert s["overall"]["sparsity"] == 0 and s["overall"]["null_rate"] == 0
    assert 0 < s["overall"]["js"] < math.log(4)


def test_a_head_that_is_null_everywhere():
    w = torch.rand(1, 3, 4, 5) + 0.1
    w[:, 2] = 0
    pairs = valid_pairs(torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool))
    layer = summary_for(w, pairs)["layers"][0]
    assert [h["null_rate"] for h in layer["heads"]] == [0, 0, 1]
    assert [h["sparsity"] for h in layer["heads"]] == [0, 0, 1]
    # JS over the two live heads only equals JS computed without the null head
    expected, _ = js_per_query(w[:, :2], pairs)
    assert layer["js"] == pytest.approx(float(expected.mean()))


def test_js_known_values():
    pairs = torch.ones(1, 1, 2, dtype=torch.bool)
    identical = torch.tensor([[[[0.3, 0.7]], [[0.3, 0.7]]]])
    disjoint = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert float(js_per_query(identical, pairs)[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(js_per_query(disjoint, pairs)[0]) == pytest.approx(math.log(2))
    # ReLA rows are renormalised: scaling a head does not change JS
    scaled = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.5]]]])
    assert float(js_per_query(scaled, pairs)[0]) == pytest.approx(math.log(2))


def test_js_skips_queries_with_fewer_than_two_live_heads_and_reports_the_uniform_variant():
    pairs = torch.ones(1, 2, 2, dtype=torch.bool)
    w = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]],    # head 0: query 1 null
                       [[0.0, 1.0], [0.0, 0.0]]]])  # head 1: query 1 null
    js, used = js_per_query(w, pairs)
    assert used == 1 and float(js[0]) == pytest.approx(math.log(2))
    js_u, used_u = js_per_query(w, pairs, keep_null_as_uniform=True)
    assert used_u == 2 and float(js_u[1]) == pytest.approx(0.0, abs=1e-12)


def test_padding_queries_and_keys_never_count_in_js():
    w = torch.rand(1, 2, 3, 4)
    pairs = valid_pairs(torch.tensor([[True, True, False]]), torch.tensor([[True, True, True, False]]))
    js, used = js_per_query(w, pairs)
    assert used == 2
    w2 = w.clone()
    w2[..., 3] = 100.0  # padded key
    w2[:, :, 2] = 5.0  # padded query
    torch.testing.assert_close(js_per_query(w2, pairs)[0], js)


def test_attention_type_from_module_names():
    assert module_attention_type("encoder.layers.3.self_attn") == ("encoder", 3)
    assert module_attention_type("decoder.layers.0.self_attn") == ("decoder", 0)
    assert module_attention_type("decoder.layers.5.encoder_attn") == ("cross", 5)
    assert module_attention_type("decoder.output_projection") is None


# --------------------------------------------------------------------------- alignment extraction

def test_normal_and_shifted_rows_and_null_rows():
    # 3 target subwords (+ EOS row), 3 source subwords (EOS already removed)
    rows = torch.tensor([[0.1, 0.9, 0.0],   # predicts y0 (decoder input EOS)
                         [0.0, 0.0, 0.0],   # predicts y1: null row -> no normal link for y1
                         [0.8, 0.1, 0.1],   # predicts y2
                         [0.0, 0.2, 0.7]])  # predicts EOS (decoder input y2)
    assert hard_links(rows, range(3), shifted=False) == {(1, 0), (0, 2)}
    # shifted: y_i uses the row where it is the decoder input: y0 -> row 1 (null), y1 -> row 2, y2 -> row 3
    assert hard_links(rows, range(3), shifted=True) == {(0, 1), (2, 2)}


def test_a_row_with_almost_no_weight_aligns_nothing_under_the_null_threshold():
    rows = torch.tensor([[0.004, 0.003, 0.001],   # 0.8% in all: a soft switch-off (sigmoid, the null slot)
                         [0.1, 0.6, 0.2]])
    assert hard_links(rows, range(2), shifted=False) == {(0, 0), (1, 1)}  # default 0: only an exactly null row
    assert hard_links(rows, range(2), shifted=False, null_threshold=0.01) == {(1, 1)}
    exact = torch.tensor([[0.25, 0.25, 0.0]])  # sums exactly to 0.5
    assert hard_links(exact, [0], shifted=False, null_threshold=0.5) == set()  # at most the threshold: no link


def test_argmax_on_a_null_row_would_link_position_zero():
    rows = torch.zeros(2, 4)
    assert int(rows[0].argmax()) == 0  # what fairseq's --print-alignment does
    assert hard_links(rows, [0], shifted=False) == set()


def test_subword_to_word_mapping_for_both_segmentations():
    spm = ["\u2581the", "\u2581fa", "rm", "ers", "\u2581see"]
    bpe = ["the", "fa@@", "rm@@", "ers", "see"]
    assert word_index(spm, "spm") == [0, 1, 1, 1, 2]
    assert word_index(bpe, "bpe") == [0, 1, 1, 1, 2]
    assert word_index(["a", "b"], "none") == [0, 1]
    assert detect_segmentation([spm]) == "spm" and detect_segmentation([bpe]) == "bpe"
    assert detect_segmentation([["a", "b"]]) == "none"
    # a word pair is aligned if any of their subwords are
    links = {(1, 0), (2, 0), (3, 1), (4, 2), (0, 2)}
    assert to_words(links, word_index(spm, "spm"), [0, 0, 1]) == {(1, 0), (2, 1), (0, 1)}
    assert to_words(links, word_index(spm, "spm"), [0, 0, 1], swap=True) == {(0, 1), (1, 2), (1, 0)}


class _Dict:
    unk_word = "<unk>"

    def __init__(self, symbols):
        self.symbols = symbols

    def __getitem__(self, i):
        return self.symbols[i]


def test_collector_excludes_eos_and_padding_and_keeps_sentence_ids():
    # dictionary: 0 <s>, 1 <pad>, 2 </s>, 3.. words
    d = _Dict(["<s>", "<pad>", "</s>", "\u2581a", "\u2581b", "c", "\u2581x", "\u2581y"])
    src = torch.tensor([[1, 3, 4, 5, 2]])  # left-padded: <pad> ▁a ▁b c </s>  -> words a, bc
    prev = torch.tensor([[2, 6, 7]])  # </s> ▁x ▁y
    tgt = torch.tensor([[6, 7, 2]])  # ▁x ▁y </s>
    attn = torch.zeros(1, 1, 3, 5)
    attn[0, 0, 0] = torch.tensor([0.0, 0.1, 0.2, 0.3, 5.0])  # EOS has the most weight: excluded -> c
    attn[0, 0, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # attends to EOS only: no link
    batch = ForcedBatch(torch.tensor([7]), src, prev, tgt, {("cross", 0): attn}, pad=1, eos=2)
    collector = AlignmentCollector(d, d)
    collector.add(batch)
    assert collector.links[(0, 0, "normal")][7] == {(1, 0)}  # c is in word 1 ("bc")
    assert collector.links[(0, "avg", "normal")][7] == {(1, 0)}
    assert collector.words[7][2] == [0, 1, 1] and collector.words[7][3] == [0, 1]


def test_left_padded_targets_align_like_right_padded_ones():
    """fairseq's --left-pad-target puts the padding in front of the target and of the decoder input: the rows of the
    real target subwords are found, not assumed to come first."""
    d = _Dict(["<s>", "<pad>", "</s>", "\u2581a", "\u2581b", "\u2581x", "\u2581y"])
    src = torch.tensor([[3, 4, 2]])  # ▁a ▁b </s>
    attn = torch.zeros(1, 1, 3, 3)
    attn[0, 0, 0] = torch.tensor([0.0, 0.9, 0.1])  # predicts ▁x: -> ▁b
    attn[0, 0, 1] = torch.tensor([0.8, 0.0, 0.1])  # predicts ▁y: -> ▁a
    attn[0, 0, 2] = torch.tensor([0.0, 0.7, 0.0])  # predicts </s> (decoder input ▁y)
    right = ForcedBatch(torch.tensor([0]), src, torch.tensor([[2, 5, 6, 1]]), torch.tensor([[5, 6, 2, 1]]),
                        {("cross", 0): torch.cat([attn, torch.zeros(1, 1, 1, 3)], 2)}, pad=1, eos=2)
    left = ForcedBatch(torch.tensor([0]), src, torch.tensor([[1, 2, 5, 6]]), torch.tensor([[1, 5, 6, 2]]),
                       {("cross", 0): torch.cat([torch.zeros(1, 1, 1, 3), attn], 2)}, pad=1, eos=2)
    links = []
    for batch in (right, left):
        collector = AlignmentCollector(d, d)
        collector.add(batch)
        assert collector.words[0][1] == ["\u2581x", "\u2581y"]
        links.append({mode: collector.links[(0, 0, mode)][0] for mode in ("normal", "shifted")})
    assert links[0] == links[1] == {"normal": {(1, 0), (0, 1)}, "shifted": {(0, 0), (1, 1)}}


def _diagonal_batch(src_ids, tgt_ids, sid=0):
    """A one-sentence batch whose cross-attention links target subword i to source subword i (normal rows)."""
    src = torch.tensor([src_ids + [2]])
    tgt = torch.tensor([tgt_ids + [2]])
    prev = torch.tensor([[2] + tgt_ids])
    attn = torch.zeros(1, 1, len(tgt_ids) + 1, len(src_ids) + 1)
    for i in range(len(tgt_ids)):
        attn[0, 0, i, i] = 1.0
    return ForcedBatch(torch.tensor([sid]), src, prev, tgt, {("cross", 0): attn}, pad=1, eos=2)


@pytest.mark.parametrize("segmentation, src_text, src_words", [
    # "▁Müller" is not in the dictionary: <unk> lost its "▁", and read from the dictionary it would join "▁das"
    ("spm", ["\u2581das", "\u2581Müller", "\u2581ist"], [0, 1, 2]),
    # "xy@@" is not in the dictionary: <unk> lost its "@@", and "z" would start a word of its own
    ("bpe", ["xy@@", "z", "c", "d"], [0, 0, 1, 2]),
])
def test_unknown_subwords_take_their_word_boundaries_from_the_subword_text(segmentation, src_text, src_words):
    words = {"spm": ["\u2581das", "\u2581ist", "\u2581A", "\u2581B", "\u2581C", "\u2581D"],
             "bpe": ["z", "c", "d", "q@@", "A", "B", "C", "D"]}[segmentation]
    d = _Dict(["<s>", "<pad>", "</s>", "<unk>"] + words)
    src_ids = [d.symbols.index(t) if t in d.symbols else 3 for t in src_text]
    tgt_text = [t for t in words if t.strip("\u2581") in "ABCD"][:len(src_ids)]  # one subword a word
    batch = _diagonal_batch(src_ids, [d.symbols.index(t) for t in tgt_text])
    assert 3 in src_ids  # the source has an <unk>

    with pytest.raises(SubwordTextError, match=r"sentence 0 has a source subword outside .*<unk>, position \d.*"
                                               r"--subword-text PREFIX"):
        AlignmentCollector(d, d).add(batch)

    collector = AlignmentCollector(d, d, subword_text=([src_text], [tgt_text]))
    collector.add(batch)
    assert collector.segmentation == segmentation  # detected from the vocabularies
    assert collector.words[0][0] == src_text and collector.words[0][2] == src_words
    expected = {(src_words[i], i) for i in range(len(tgt_text))}
    assert collector.links[(0, 0, "normal")][0] == expected


def test_a_sentence_without_unknown_subwords_needs_no_subword_text():
    d = _Dict(["<s>", "<pad>", "</s>", "<unk>", "\u2581a", "b"])
    collector = AlignmentCollector(d, d)
    collector.add(_diagonal_batch([4, 5, 4], [4, 4]))
    assert collector.words[0][2] == [0, 0, 1]
    # with segmentation "none" every subword is a word, <unk> included
    collector = AlignmentCollector(d, d, segmentation="none")
    collector.add(_diagonal_batch([4, 3, 4], [4, 4]))
    assert collector.words[0][2] == [0, 1, 2]


def test_subword_text_that_does_not_match_the_subset_is_refused(tmp_path):
    d = _Dict(["<s>", "<pad>", "</s>", "<unk>", "\u2581a", "b"])
    collector = AlignmentCollector(d, d, subword_text=([["\u2581a", "b"]], [["\u2581a", "\u2581a"]]))
    with pytest.raises(SubwordTextError, match="sentence 0 \\(line 1\\) of the subword text has 2 source subwords but "
                                               "the binarised subset has 3"):
        collector.add(_diagonal_batch([4, 5, 4], [4, 4]))

    (tmp_path / "t.de").write_text("\u2581a b\n\u2581a\n")
    (tmp_path / "t.en").write_text("\u2581x\n\u2581y \u2581z\n")
    assert read_subword_text(str(tmp_path / "t"), ("de", "en"), 2) == ([["\u2581a", "b"], ["\u2581a"]],
                                                                      [["\u2581x"], ["\u2581y", "\u2581z"]])
    with pytest.raises(SubwordTextError, match=r"t.de has 2 lines but the subset has 3 sentences"):
        read_subword_text(str(tmp_path / "t"), ("de", "en"), 3)
    with pytest.raises(SubwordTextError, match=r"--subword-text .*/u: cannot read .*/u.de \(No such file"):
        read_subword_text(str(tmp_path / "u"), ("de", "en"), 2)
