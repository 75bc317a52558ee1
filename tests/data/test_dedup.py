import random

from scalelm.data.dedup import Deduplicator, digest, minhash_signature


def text(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa",
                                "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma"]) for _ in range(n))


def check(d: Deduplicator, t: str) -> str | None:
    return d.check(digest(t), minhash_signature(t))


def test_exact_duplicates():
    d = Deduplicator("exact")
    assert check(d, "one") is None and check(d, "two") is None and check(d, "one") == "exact_duplicate"


def test_near_duplicates_found_and_distinct_texts_kept():
    d = Deduplicator("minhash", threshold=0.8)
    original = text(1)
    words = original.split()
    words[150] = "CHANGED"  # one word in 300: Jaccard of 5-grams ~0.97
    assert check(d, original) is None
    assert check(d, " ".join(words)) == "near_duplicate"
    assert check(d, text(2)) is None  # unrelated text of the same words


def test_exact_mode_keeps_near_duplicates():
    d = Deduplicator("exact")
    original = text(3)
    assert check(d, original) is None and check(d, original + " extra") is None


def test_none_mode_keeps_everything():
    d = Deduplicator("none")
    assert check(d, "same") is None and check(d, "same") is None
