"""pass@k and maj@k from n samples per prompt: pure Python, no torch, no Ray (importable alone).

Per prompt there are n samples, each with a correctness bit (its reward at or above the eval's threshold) and,
for maj@k, the answer it gives (a hashable key, or None when it gives none). Both metrics are averaged over
prompts by the caller.
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate of Chen et al. (2021) for one prompt with ``c`` correct of ``n`` samples.

    pass@k = 1 - C(n - c, k) / C(n, k): the chance that k samples drawn without replacement from the n include
    at least one correct one. Computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i) (the paper's
    numerically stable form: no binomial coefficients, which overflow floats for n in the hundreds); 1.0 when
    n - c < k (every k-subset holds a correct sample).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_correct(answers: Sequence[Optional[Hashable]], correct: Sequence[bool]) -> float:
    """Whether the majority answer of one group of samples is correct, as an expectation over ties.

    The answer given most often wins (None abstains; a group where every sample abstains scores 0). An answer
    is as correct as the samples that gave it: c(a) = mean(correct_j for j with answers_j = a) (1 or 0 when, as
    with a verifier, correctness is a function of the answer). With t answers tied for most votes the vote is
    a fair draw among them: (1 / t) * sum of c(a) over the tied a.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_correct: {len(answers)} answers but {len(correct)} correctness values")
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [a for a, v in votes.items() if v == top]
    score = 0.0
    for a in tied:
        given = [bool(ok) for ans, ok in zip(answers, correct) if ans == a]
        score += sum(given) / len(given)
    return score / len(tied)


def maj_at_k(answers: Sequence[Optional[Hashable]], correct: Sequence[bool], k: int) -> float:
    """maj@k of one prompt from its n samples: the majority vote of k samples is correct (``majority_correct``).

    The n samples (in the order they were drawn, i.i.d.) are cut into floor(n / k) disjoint blocks of k, each a
    draw of k samples, and the blocks' majority_correct values are averaged: an unbiased estimate of maj@k that
    uses as many samples as fit; samples past the last full block are not used (n = 10, k = 4 uses 8).
    """
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k: need 1 <= k <= n, got k={k}, n={n}")
    blocks = n // k
    return sum(majority_correct(answers[b * k:(b + 1) * k], correct[b * k:(b + 1) * k]) for b in range(blocks)) / blocks
