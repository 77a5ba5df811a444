"""Evaluation metrics: accuracy, macro-F1, ROUGE-L F1, corpus BLEU, perplexity.

ROUGE-L uses ``rouge_score`` (``RougeScorer(["rougeL"], use_stemmer=True)``) when it is
installed; otherwise an LCS implementation with the same tokenization (lowercase, runs of
``[a-z0-9]``, Porter stemming of tokens longer than 3 characters when nltk is installed)
gives the same numbers. BLEU uses nltk's ``corpus_bleu`` with ``SmoothingFunction().method1``
when nltk is installed; otherwise an equivalent implementation (uniform 4-gram weights,
clipped corpus-level n-gram precisions, method1 smoothing with epsilon 0.1 for zero counts,
brevity penalty against the closest reference length).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Hashable, Sequence

__all__ = ["accuracy", "macro_f1", "rouge_l_f1", "corpus_bleu", "perplexity", "lcs_length",
           "rouge_tokenize"]


def accuracy(preds: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Fraction of positions where ``preds[i] == labels[i]``."""
    if len(preds) != len(labels):
        raise ValueError(f"accuracy: {len(preds)} predictions vs {len(labels)} labels")
    if not labels:
        return 0.0
    return sum(int(p == t) for p, t in zip(preds, labels)) / len(labels)


def macro_f1(preds: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions
    (as scikit-learn's ``f1_score(average="macro")``); a class with no true positives has F1 0."""
    if len(preds) != len(labels):
        raise ValueError(f"macro_f1: {len(preds)} predictions vs {len(labels)} labels")
    classes = sorted(set(labels) | set(preds), key=repr)
    if not classes:
        return 0.0
    f1s = []
    for c in classes:
        tp = sum(1 for p, t in zip(preds, labels) if p == c and t == c)
        fp = sum(1 for p, t in zip(preds, labels) if p == c and t != c)
        fn = sum(1 for p, t in zip(preds, labels) if p != c and t == c)
        denom = 2 * tp + fp + fn
        f1s.append(0.0 if denom == 0 else 2 * tp / denom)
    return sum(f1s) / len(f1s)


def perplexity(mean_token_loss: float) -> float:
    """exp(mean token cross-entropy), inf on overflow."""
    try:
        return math.exp(mean_token_loss)
    except OverflowError:
        return float("inf")


# ---------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------
_stemmer = None


def _stem(token: str) -> str:
    global _stemmer
    if _stemmer is None:
        try:
            from nltk.stem import porter  # noqa: PLC0415

            _stemmer = porter.PorterStemmer()
        except ImportError:
            _stemmer = False
    return _stemmer.stem(token) if _stemmer else token


def rouge_tokenize(text: str, stem: bool = True) -> list[str]:
    """rouge_score's default tokenization: lowercase, non ``[a-z0-9]`` -> space, split,
    Porter-stem tokens longer than 3 characters."""
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if stem:
        tokens = [_stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if re.match(r"^[a-z0-9]+$", t)]


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l_lcs(pred: str, ref: str) -> float:
    p, r = rouge_tokenize(pred), rouge_tokenize(ref)
    if not p or not r:
        return 0.0
    lcs = lcs_length(r, p)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l_f1(preds: Sequence[str], refs: Sequence[str], backend: str = "auto") -> float:
    """Mean ROUGE-L F1 (with stemming) of ``preds[i]`` against ``refs[i]``, in [0, 1].

    ``backend``: ``"auto"`` (rouge_score if installed), ``"rouge_score"`` or ``"lcs"``.
    """
    if len(preds) != len(refs):
        raise ValueError(f"rouge_l_f1: {len(preds)} predictions vs {len(refs)} references")
    if not preds:
        return 0.0
    scorer = None
    if backend in ("auto", "rouge_score"):
        try:
            from rouge_score import rouge_scorer  # noqa: PLC0415

            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        except ImportError:
            if backend == "rouge_score":
                raise
    if scorer is not None:
        return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(preds)
    return sum(_rouge_l_lcs(p, r) for p, r in zip(preds, refs)) / len(preds)


# ---------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------
def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _corpus_bleu_own(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
                     max_n: int = 4, epsilon: float = 0.1) -> float:
    numerators = [0] * (max_n + 1)
    denominators = [0] * (max_n + 1)
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for ref in refs:
                for g, c in _ngrams(ref, n).items():
                    max_ref[g] = max(max_ref[g], c)
            numerators[n] += sum(min(c, max_ref[g]) for g, c in counts.items())
            denominators[n] += max(1, sum(counts.values()))
        hl = len(hyp)
        hyp_len += hl
        ref_len += min((abs(len(r) - hl), len(r)) for r in refs)[1]
    if numerators[1] == 0:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        num = numerators[n] if numerators[n] != 0 else epsilon
        log_p += (1.0 / max_n) * math.log(num / denominators[n])
    bp = 1.0 if hyp_len > ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0)
    return bp * math.exp(log_p)


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]] | Sequence[Sequence[Sequence[str]]],
                backend: str = "auto") -> float:
    """Corpus BLEU-4 in [0, 1] with smoothing method1.

    ``hypotheses``: token lists. ``references``: one token list per hypothesis, or a list of
    token lists (several references) per hypothesis. ``backend``: ``"auto"`` (nltk if
    installed), ``"nltk"`` or ``"own"``.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses vs {len(references)} references")
    if not hypotheses:
        return 0.0
    refs = [[list(r)] if (not r or isinstance(r[0], str)) else [list(x) for x in r] for r in references]
    hyps = [list(h) for h in hypotheses]
    if backend in ("auto", "nltk"):
        try:
            from nltk.translate.bleu_score import SmoothingFunction  # noqa: PLC0415
            from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu  # noqa: PLC0415
        except ImportError:
            if backend == "nltk":
                raise
        else:
            return float(nltk_corpus_bleu(refs, hyps, smoothing_function=SmoothingFunction().method1))
    return _corpus_bleu_own(hyps, refs)
