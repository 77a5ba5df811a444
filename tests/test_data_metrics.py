"""fastseq.data.metrics against hand-computed values."""

import importlib.util
import math

import pytest

from fastseq.data import metrics

HAS_ROUGE = importlib.util.find_spec("rouge_score") is not None
HAS_NLTK = importlib.util.find_spec("nltk") is not None
BLEU_BACKENDS = ["own"] + (["nltk"] if HAS_NLTK else [])
needs_rouge = pytest.mark.skipif(not HAS_ROUGE, reason="rouge-score not installed")


def test_accuracy():
    assert metrics.accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 0.75
    assert metrics.accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        metrics.accuracy([0], [0, 1])


def test_macro_f1_hand_computed():
    # class 0: tp1 fp0 fn0 -> 1; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp1 fp0 fn1 -> 2/3
    assert metrics.macro_f1([0, 1, 1, 2], [0, 1, 2, 2]) == pytest.approx(7 / 9)
    # a class only predicted (never true) counts with F1 0, as scikit-learn's macro average
    assert metrics.macro_f1([1, 1], [0, 0]) == 0.0
    assert metrics.macro_f1(["a", "b"], ["a", "b"]) == 1.0


def test_perplexity():
    assert metrics.perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert metrics.perplexity(1e6) == float("inf")


def test_lcs_length():
    assert metrics.lcs_length("abcbdab", "bdcaba") == 4
    assert metrics.lcs_length([], [1]) == 0


@pytest.mark.parametrize("backend", [pytest.param("rouge_score", marks=needs_rouge), "lcs"])
def test_rouge_l_hand_computed(backend):
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens each: F = 5/6
    assert metrics.rouge_l_f1(["the cat sat on the mat"], ["the cat is on the mat"], backend=backend) \
        == pytest.approx(5 / 6)
    # stemming: cats -> cat, running/runs -> run; case and punctuation ignored
    assert metrics.rouge_l_f1(["Cats running!"], ["cat runs"], backend=backend) == pytest.approx(1.0)
    # mean over pairs: (1 + 0) / 2
    assert metrics.rouge_l_f1(["a b", "x"], ["a b", "y"], backend=backend) == pytest.approx(0.5)
    # precision 1/1, recall 1/3 -> F = 2 * 1 * (1/3) / (4/3) = 0.5
    assert metrics.rouge_l_f1(["fever"], ["fever and headache"], backend=backend) == pytest.approx(0.5)
    assert metrics.rouge_l_f1([""], ["something"], backend=backend) == 0.0


@needs_rouge
def test_rouge_backends_agree():
    preds = ["Glaucoma damages the optic nerves slowly.", "iron supplements", "the answer is 42", "no"]
    refs = ["Glaucoma is a group of eye disorders that damage the optic nerve.",
            "Treatments include iron supplements and a better diet.", "42 is the answer", "yes"]
    assert metrics.rouge_l_f1(preds, refs, backend="lcs") == pytest.approx(
        metrics.rouge_l_f1(preds, refs, backend="rouge_score"))


def test_bleu_hand_computed():
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    # clipped precisions 5/6, 3/5, 1/4, 0/3 -> method1: 0.1/3; equal lengths -> BP = 1
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    for backend in BLEU_BACKENDS:
        assert metrics.corpus_bleu([hyp], [ref], backend=backend) == pytest.approx(expected)
        assert metrics.corpus_bleu([ref], [ref], backend=backend) == pytest.approx(1.0)


def test_bleu_brevity_penalty_and_zero():
    hyp, ref = ["the", "cat"], "the cat sat on the mat".split()
    # p1 = p2 = 1, p3 = p4 = 0.1 / 1 (empty n-gram sets count 1 in the denominator); BP = exp(1 - 6/2)
    expected = math.exp(1 - 6 / 2) * (1 * 1 * 0.1 * 0.1) ** 0.25
    for backend in BLEU_BACKENDS:
        assert metrics.corpus_bleu([hyp], [ref], backend=backend) == pytest.approx(expected)
        assert metrics.corpus_bleu([["dog"]], [ref], backend=backend) == 0.0


@pytest.mark.skipif(not HAS_NLTK, reason="nltk not installed")
def test_bleu_corpus_level_and_multi_reference_agree():
    hyps = [s.split() for s in ["a b c d e", "the quick brown fox", "x y", "one two three four five six"]]
    refs = [[s.split() for s in r] for r in [["a b c d f", "a b x d e"], ["the quick red fox jumps"], ["x y z"],
                                             ["one two three four five six"]]]
    assert metrics.corpus_bleu(hyps, refs, backend="own") == pytest.approx(
        metrics.corpus_bleu(hyps, refs, backend="nltk"))
