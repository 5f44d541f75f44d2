"""Greedy and beam-search CTC decoding, and the n-gram language models used as scorers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from speechvq.decoding import Lexicon, beam_decode, beam_search, collapse, greedy_decode, greedy_paths
from speechvq.errors import UserInputError
from speechvq.text import ArpaLM, Vocabulary, load_language_model, train_ngram

VOCAB = Vocabulary.letters(["THE CAT CAP"])


def _frames(*rows: dict[str, float]) -> torch.Tensor:
    """``[T, V]`` log-probabilities from per-frame {token: prob} (the rest spread evenly)."""
    out = []
    for row in rows:
        probs = torch.full((len(VOCAB),), 0.0)
        for token, p in row.items():
            probs[VOCAB.blank_id if token == "_" else VOCAB.token_to_id(token)] = p
        rest = 1.0 - float(probs.sum())
        probs[probs == 0] = max(rest, 1e-6) / int((probs == 0).sum())
        out.append(probs / probs.sum())
    return torch.stack(out).log()


def _exact_log_prob(log_probs: torch.Tensor, ids: tuple[int, ...] | list[int]) -> float:
    """ln P(ids | frames) summed over every alignment (torch's CTC forward algorithm)."""
    target = torch.tensor([list(ids)]) if ids else torch.zeros(1, 1, dtype=torch.long)
    loss = F.ctc_loss(
        log_probs[:, None, :],
        target,
        torch.tensor([log_probs.size(0)]),
        torch.tensor([len(ids)]),
        reduction="sum",
    )
    return -float(loss)


def test_greedy_decode_takes_the_best_path_and_collapses_it():
    lp = _frames({"C": 0.9}, {"C": 0.9}, {"_": 0.9}, {"A": 0.8}, {"|": 0.7}, {"T": 0.9}, {"T": 0.9})
    assert greedy_paths(lp[None])[0] == [VOCAB.token_to_id(t) if t != "_" else 0 for t in "CC_A|TT"]
    assert greedy_decode(lp[None], None, VOCAB) == ["CA T"]
    assert greedy_decode(lp[None], torch.tensor([4]), VOCAB) == ["CA"]
    assert collapse([5, 5, 0, 5, 6, 6, 0], blank_id=0) == [5, 5, 6]


def test_beam_search_with_beam_one_and_no_lm_equals_greedy_on_peaky_posteriors():
    # peaky: every frame gives one token (blank included) at least 0.9, as trained CTC models do
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        top = torch.randint(len(VOCAB), (25,), generator=g)
        top[torch.rand(25, generator=g) < 0.5] = VOCAB.blank_id
        probs = torch.rand(25, len(VOCAB), generator=g)
        probs = 0.1 * probs / probs.sum(-1, keepdim=True)
        probs[torch.arange(25), top] += 0.9
        lp = probs.log()
        best = beam_search(lp, VOCAB, beam_size=1)[0]
        assert best.text == greedy_decode(lp[None], None, VOCAB)[0]
        assert list(best.ids) == collapse(greedy_paths(lp[None])[0], VOCAB.blank_id)


def test_beam_search_finds_the_prefix_that_greedy_misses():
    # two frames of p(blank) = 0.6, p(A) = 0.4: best path "" (0.36), but P("A") = 0.64
    lp = _frames({"_": 0.6, "A": 0.4}, {"_": 0.6, "A": 0.4})
    assert greedy_decode(lp[None], None, VOCAB) == [""]
    best = beam_search(lp, VOCAB, beam_size=4)[0]
    assert best.text == "A"
    assert best.acoustic_score == pytest.approx(math.log(0.64), abs=1e-5)


def test_beam_search_scores_are_exact_prefix_probabilities_when_nothing_is_pruned():
    vocab = Vocabulary.letters(["AB"])  # 6 non-blank tokens: 6**5 prefixes after 5 frames, all kept
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(5, len(vocab), generator=g), dim=-1)
    for hyp in beam_search(lp, vocab, beam_size=10_000, token_min_logp=-1e9, num_hypotheses=5):
        assert hyp.acoustic_score == pytest.approx(_exact_log_prob(lp, hyp.ids), abs=1e-4)


def test_beam_search_result_is_at_least_as_probable_as_greedy():
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        lp = torch.log_softmax(1.5 * torch.randn(12, len(VOCAB), generator=g), dim=-1)
        greedy = collapse(greedy_paths(lp[None])[0], VOCAB.blank_id)
        best = beam_search(lp, VOCAB, beam_size=32)[0]
        assert _exact_log_prob(lp, best.ids) >= _exact_log_prob(lp, greedy) - 1e-6


def _cat_or_cap() -> torch.Tensor:
    """Acoustics for "THE CA?" where P is slightly more likely than T."""
    rows = [{"T": 0.9}, {"H": 0.9}, {"E": 0.9}, {"|": 0.9}, {"C": 0.9}, {"A": 0.9}, {"P": 0.5, "T": 0.45}]
    return _frames(*rows)


def test_a_word_lm_fixes_what_greedy_gets_wrong():
    lp = _cat_or_cap()
    assert greedy_decode(lp[None], None, VOCAB) == ["THE CAP"]
    lm = train_ngram([s.split() for s in ["THE CAT", "THE CAT SAT", "A CAT"]], order=2)
    assert beam_search(lp, VOCAB, beam_size=8)[0].text == "THE CAP"  # no LM: acoustics win
    assert beam_search(lp, VOCAB, beam_size=8, lm=lm, lm_weight=1.0)[0].text == "THE CAT"


def test_a_character_lm_fixes_what_greedy_gets_wrong():
    lp = _cat_or_cap()
    lines = [list("|".join(s.split())) for s in ["THE CAT", "THE CAT", "A CAT"]]
    lm = train_ngram(lines, order=4, unit="char")
    assert beam_decode(lp[None], None, VOCAB, beam_size=8, lm=lm, lm_weight=1.0) == ["THE CAT"]


def test_a_lexicon_alone_keeps_the_search_to_its_words():
    lp = _cat_or_cap()
    assert beam_search(lp, VOCAB, beam_size=8)[0].text == "THE CAP"
    lexicon = Lexicon.build(["THE", "CAT", "A"])
    assert beam_search(lp, VOCAB, beam_size=8, lexicon=lexicon)[0].text == "THE CAT"
    # every hypothesis it returns is made of lexicon words
    for hyp in beam_search(lp, VOCAB, beam_size=8, lexicon=lexicon, num_hypotheses=8):
        assert set(hyp.text.split()) <= lexicon.words, hyp.text


def test_a_lexicon_falls_back_to_unfinished_words_only_when_nothing_else_is_left():
    lp = _frames({"C": 0.95}, {"A": 0.95})  # "CA": a prefix of CAT, not a word
    lexicon = Lexicon.build(["CAT"])
    # beam 1 keeps only "CA"; it ends inside a word, and is returned because nothing else is left
    assert beam_search(lp, VOCAB, beam_size=1, lexicon=lexicon)[0].text == "CA"
    # a wider beam also keeps the empty hypothesis, which ends on a word boundary and wins
    assert beam_search(lp, VOCAB, beam_size=8, lexicon=lexicon)[0].text == ""


def test_lexicon_lookahead_is_the_best_unigram_below_each_prefix():
    lm = train_ngram([s.split() for s in ["THE CAT", "THE CAT SAT", "A CAP"]], order=2)
    lexicon = Lexicon.build(["THE", "CAT", "CAP", "A"], lm)
    assert lexicon.lookahead["CA"] == pytest.approx(max(lm.unigram("CAT"), lm.unigram("CAP")))
    assert lexicon.lookahead["CAP"] == pytest.approx(lm.unigram("CAP"))
    assert lm.unigram("CAT") == pytest.approx(lm.log10_prob([], "CAT") * math.log(10))
    assert set(lexicon.lookahead) == {"T", "TH", "THE", "C", "CA", "CAT", "CAP", "A"}
    assert Lexicon.build(["AB"]).lookahead == {"A": 0.0, "AB": 0.0}  # no LM: no look-ahead


def test_lookahead_only_ranks_the_beam_the_returned_scores_are_exact():
    lp = _cat_or_cap()
    lm = train_ngram([s.split() for s in ["THE CAT", "THE CAT SAT", "A CAT"]], order=2)
    lexicon = Lexicon.build(lm.words, lm)
    hyps = beam_search(
        lp, VOCAB, beam_size=8, lm=lm, lm_weight=1.0, word_bonus=0.5, lexicon=lexicon, num_hypotheses=3
    )
    assert hyps[0].text == "THE CAT"
    for hyp in hyps:
        words = hyp.text.split()
        assert hyp.lm_score == pytest.approx(lm.sentence_log10(words) * math.log(10), abs=1e-6)
        assert hyp.score == pytest.approx(hyp.acoustic_score + hyp.lm_score + 0.5 * len(words), abs=1e-6)


def test_lexicon_files_read_words_and_flashlight_spellings(tmp_path):
    (tmp_path / "words.txt").write_text("CAT\n\nTHE\n")
    (tmp_path / "flashlight.lex").write_text("CAT C A T |\nTHE T H E |\n")
    assert Lexicon.load(tmp_path / "words.txt").words == {"CAT", "THE"}
    assert Lexicon.load(tmp_path / "flashlight.lex").words == {"CAT", "THE"}
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserInputError, match=r"empty\.txt: lexicon holds no word"):
        Lexicon.load(tmp_path / "empty.txt")
    with pytest.raises(UserInputError, match=r"missing\.txt: lexicon file does not exist"):
        Lexicon.load(tmp_path / "missing.txt")


def test_witten_bell_unigrams_match_hand_computed_values():
    lm = train_ngram([["a", "b"], ["a"]], order=1)
    # N = 5 tokens (a, b, </s>, a, </s>), T = 3 types, V = 3 + <unk>: P(w) = (c + T/V) / (N + T)
    assert 10 ** lm.log10_prob([], "a") == pytest.approx((2 + 0.75) / 8)
    assert 10 ** lm.log10_prob([], "b") == pytest.approx((1 + 0.75) / 8)
    assert 10 ** lm.log10_prob([], "zzz") == pytest.approx(0.75 / 8)


def test_ngram_lm_distributions_sum_to_one_in_every_context():
    lm = train_ngram([s.split() for s in ["a b c", "a b", "b c a", "c"]], order=3)
    units = ["a", "b", "c", "</s>", "<unk>"]
    for context in ([], ["<s>"], ["a"], ["a", "b"], ["<s>", "a"], ["c", "c"], ["zzz"]):
        total = sum(10 ** lm.log10_prob(context, u) for u in units)
        assert total == pytest.approx(1.0, abs=1e-9), context


def test_arpa_file_round_trips(tmp_path):
    lm = train_ngram([s.split() for s in ["a b c", "a b", "b c a"]], order=3)
    lm.save(tmp_path / "lm.arpa")
    loaded = load_language_model(tmp_path / "lm.arpa")
    assert isinstance(loaded, ArpaLM)
    for sentence in (["a", "b"], ["c", "a", "b"], ["x"]):
        assert loaded.sentence_log10(sentence) == pytest.approx(lm.sentence_log10(sentence), abs=1e-5)


def test_kenlm_scores_our_arpa_files_like_arpalm(tmp_path):
    pytest.importorskip("kenlm", reason="KenLM is the optional [lm] extra (compiled from source)")
    from speechvq.text import KenLMScorer

    lm = train_ngram([s.split() for s in ["a b c", "a b", "b c a"]], order=3)
    lm.save(tmp_path / "lm.arpa")
    ken = KenLMScorer(tmp_path / "lm.arpa")
    for sentence in (["a", "b"], ["c", "a", "b", "b"], ["x", "a"]):
        state, total = ken.begin(), 0.0
        for word in sentence:
            s, state = ken.score(state, word)
            total += s
        total += ken.end(state)
        assert total / math.log(10) == pytest.approx(lm.sentence_log10(sentence), abs=1e-4)


def test_kenlm_unigrams_lookahead_and_beam_search_equal_arpalms(tmp_path):
    pytest.importorskip("kenlm", reason="KenLM is the optional [lm] extra (compiled from source)")
    from speechvq.text import KenLMScorer

    lm = train_ngram([s.split() for s in ["THE CAT", "THE CAT SAT", "A CAP"]], order=2)
    lm.save(tmp_path / "lm.arpa")
    arpa, ken = ArpaLM.load(tmp_path / "lm.arpa"), KenLMScorer(tmp_path / "lm.arpa")
    for word in [*sorted(lm.words), "DOG"]:  # DOG: unknown, both score <unk>
        assert ken.unigram(word) == pytest.approx(arpa.unigram(word), abs=1e-4), word
    words = ["THE", "CAT", "CAP", "A", "SAT"]
    assert Lexicon.build(words, ken).lookahead == pytest.approx(
        Lexicon.build(words, arpa).lookahead, abs=1e-4
    )
    lp = _cat_or_cap()
    kwargs = dict(beam_size=8, lm_weight=1.0, word_bonus=0.5, num_hypotheses=4)
    for lexicon in (None, Lexicon.build(words, arpa)):
        want = beam_search(lp, VOCAB, lm=arpa, lexicon=lexicon, **kwargs)
        got = beam_search(lp, VOCAB, lm=ken, lexicon=lexicon, **kwargs)
        assert [h.text for h in got] == [h.text for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-3)


def test_arpa_loader_raises_user_input_error_naming_the_line(tmp_path):
    bad = tmp_path / "bad.arpa"
    bad.write_text("\\data\\\nngram 1=1\n\n\\1-grams:\nnot-a-number a\n\\end\\\n")
    with pytest.raises(UserInputError, match=r"bad\.arpa:5"):
        ArpaLM.load(bad)
