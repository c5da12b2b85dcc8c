"""LDA by SVI (viax) against sklearn's online LDA and gensim's LdaModel.

    python benchmarks/conjugate_lda.py             # NYT + 10^5-document synthetic corpus
    python benchmarks/conjugate_lda.py --quick     # NYT only, 2,000 training documents

One pass over the training documents in batches of 256, K = 20 topics,
doc_topic_prior α = 0.1, topic_word_prior η = 0.01, the step-size schedule
ρ_t = (10 + t)^(−0.7), t = 1, 2, … for all three (sklearn's defaults; gensim counts
its updates from 0, ρ = (offset + u)^(−decay), so it is given offset=11, decay=0.7 for
the same steps), at most 100 E-step iterations per document with tolerance 1e-3.
Documents/s = training documents / wall time of the fit (gensim: the LdaModel
constructor, which trains; its bag-of-words conversion is not timed).  viax is timed
cold (its first fit, XLA compilation included, on-disk cache off), rerun (the first
fit of a fresh process after an earlier one left the compiled programs in viax's
on-disk cache, the default) and warm (a second fit, compiled code reused); every
timing but the cold and rerun ones is the fastest of 2 fits (a shared machine).
Held-out perplexity: every library's topics λ are scored by the same code
(viax's LDA.perplexity, which is sklearn's bound: E-step from γ = 1, exp(−ELBO / words))
on a fixed 10% of documents (a seeded permutation); sklearn's own ``perplexity`` is
recorded beside it as a cross-check.

Data: ../shared/data/nyt/nyt.ldac (8,447 NYT articles, 3,012 words; documents without
words dropped) and a synthetic corpus drawn from LDA's generative process
(10^5 documents, V = 2,000, K = 20, 60–140 words each).  Writes
benchmarks/results/conjugate_lda.json and the table benchmarks/results/conjugate.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# Cold times include compilation: viax's on-disk compiled-code cache stays off unless
# the caller sets VIAX_CACHE_DIR (as benchmarks/_common.py does for the core ones).
os.environ.setdefault("VIAX_CACHE_DIR", "off")
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402

import viax  # noqa: E402, F401
from viax.conjugate import LDA, LDAModel  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "nyt" / "nyt.ldac"
RESULTS = ROOT / "benchmarks" / "results"
K, ALPHA, ETA, BATCH = 20, 0.1, 0.01, 256
# Timed fits per library (the fastest kept): the machine is shared, and one fit's time
# varied by up to 1.7x between runs under the same nominal load.
REPEATS = 2


def load_ldac(path: Path) -> sp.csr_matrix:
    rows, cols, vals = [], [], []
    lines = path.read_text().splitlines()
    for d, line in enumerate(lines):
        for item in line.split()[1:]:
            word, count = item.split(":")
            rows.append(d)
            cols.append(int(word))
            vals.append(float(count))
    X = sp.csr_matrix((vals, (rows, cols)), shape=(len(lines), max(cols) + 1))
    return X[np.diff(X.indptr) > 0]


def synthetic(num_docs: int, vocab: int = 2000, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    topics = rng.dirichlet(np.full(vocab, ETA), K)
    chunks = []
    for start in range(0, num_docs, 5000):
        n = min(5000, num_docs - start)
        theta = rng.dirichlet(np.full(K, ALPHA), n)
        lengths = rng.integers(60, 141, n)
        chunks.append(sp.csr_matrix(rng.multinomial(lengths, theta @ topics)))
    X = sp.vstack(chunks).tocsr()
    return X[np.diff(X.indptr) > 0]


def split(X: sp.csr_matrix, seed: int = 0):
    order = np.random.default_rng(seed).permutation(X.shape[0])
    cut = X.shape[0] // 10
    return X[np.sort(order[cut:])], X[np.sort(order[:cut])]


def perplexity(components: np.ndarray, held_out) -> tuple[float, float]:
    """Held-out perplexities of topics λ, scored by viax: sklearn's (exp(−ELBO/words),
    the ELBO including the topics' KL term, which dominates on few documents) and the
    per-document one (exp(−Σ_d ELBO_d / words), the topics' KL left out)."""
    scorer = LDA(n_components=K, doc_topic_prior=ALPHA, topic_word_prior=ETA, batch_size=BATCH)
    scorer.model_ = LDAModel.create(K, components.shape[1], ALPHA, ETA)
    scorer._set_globals({"topics": (np.asarray(components, np.float64) - 1.0,)}, 1)
    _, local_total = scorer._local_pass(held_out)
    return scorer.perplexity(held_out), float(np.exp(-local_total / held_out.sum()))


RERUN = """
import sys, time, scipy.sparse as sp
sys.path.insert(0, sys.argv[2])
from viax.conjugate import LDA
X = sp.load_npz(sys.argv[1])
k, alpha, eta, batch, seed = sys.argv[3:]
lda = LDA(n_components=int(k), doc_topic_prior=float(alpha), topic_word_prior=float(eta),
          learning_method="online", batch_size=int(batch), max_iter=1, random_state=int(seed))
t0 = time.perf_counter()
lda.fit(X)
print(time.perf_counter() - t0)
"""


def rerun_seconds(train, seed: int = 0) -> float:
    """viax's fit in a fresh process whose compiled programs are in the on-disk cache."""
    from conjugate_gmm import fresh_process_seconds

    with tempfile.TemporaryDirectory() as tmp:
        sp.save_npz(os.path.join(tmp, "data.npz"), train)
        return fresh_process_seconds(RERUN, tmp, *map(str, (K, ALPHA, ETA, BATCH, seed)))


def run_viax(train, held_out, seed: int = 0, repeats: int = REPEATS):
    def fit():
        t0 = time.perf_counter()
        lda = LDA(
            n_components=K,
            doc_topic_prior=ALPHA,
            topic_word_prior=ETA,
            learning_method="online",
            batch_size=BATCH,
            max_iter=1,
            random_state=seed,
        ).fit(train)
        return time.perf_counter() - t0, lda

    cold, first = fit()
    warm, lda = min(
        (fit() for _ in range(repeats)), key=lambda pair: pair[0], default=(cold, first)
    )
    return {
        "cold_s": cold,
        "warm_s": warm,
        "compile_s": first.result_.compile_time,
        "perplexity": perplexity(lda.components_, held_out),
    }


def run_sklearn(train, held_out, own_perplexity: bool, seed: int = 0, repeats: int = REPEATS):
    from sklearn.decomposition import LatentDirichletAllocation

    lda = LatentDirichletAllocation(
        n_components=K,
        doc_topic_prior=ALPHA,
        topic_word_prior=ETA,
        learning_method="online",
        batch_size=BATCH,
        max_iter=1,
        total_samples=train.shape[0],
        random_state=seed,
    )
    seconds = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        lda.fit(train)
        seconds.append(time.perf_counter() - t0)
    seconds = min(seconds)
    row = {"s": seconds, "perplexity": perplexity(lda.components_, held_out)}
    if own_perplexity:
        row["sklearn_own_perplexity"] = float(lda.perplexity(held_out))
    return row


def run_gensim(train, held_out, seed: int = 0, repeats: int = REPEATS):
    from gensim.models import LdaModel

    corpus = [
        list(zip(train.indices[a:b].tolist(), train.data[a:b].tolist(), strict=True))
        for a, b in zip(train.indptr[:-1], train.indptr[1:], strict=True)
    ]
    seconds = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        lda = LdaModel(
            corpus=corpus,
            num_topics=K,
            id2word={i: str(i) for i in range(train.shape[1])},
            chunksize=BATCH,
            passes=1,
            update_every=1,
            alpha=np.full(K, ALPHA),
            eta=ETA,
            decay=0.7,
            offset=11.0,  # gensim: ρ = (offset + u)^(−decay), u = 0, 1, …: sklearn ρ_1 = 11^(−0.7)
            iterations=100,
            gamma_threshold=1e-3,
            eval_every=None,
            random_state=seed,
        )
        seconds.append(time.perf_counter() - t0)
    seconds = min(seconds)
    return {"s": seconds, "perplexity": perplexity(lda.state.get_lambda(), held_out)}


def bench(name: str, X: sp.csr_matrix, own_perplexity: bool) -> list[dict]:
    train, held_out = split(X)
    n = train.shape[0]
    print(f"[{name}] train {n} docs, held out {held_out.shape[0]}, V={X.shape[1]}", flush=True)
    ours = run_viax(train, held_out)
    ours["rerun_s"] = rerun_seconds(train)
    print(" viax", ours, flush=True)
    sk = run_sklearn(train, held_out, own_perplexity)
    print(" sklearn", sk, flush=True)
    gs = run_gensim(train, held_out)
    print(" gensim", gs, flush=True)
    base = {"data": name, "train_docs": n, "held_out_docs": int(held_out.shape[0])}
    for row in (ours, sk, gs):
        row["perplexity"], row["perplexity_docs"] = row["perplexity"]
    return [
        {
            **base,
            "library": "viax SVI (warm)",
            "docs_per_s": n / ours["warm_s"],
            "perplexity": ours["perplexity"],
            "perplexity_docs": ours["perplexity_docs"],
            "seconds": ours["warm_s"],
        },
        {
            **base,
            "library": "viax SVI (cold: incl. compile)",
            "docs_per_s": n / ours["cold_s"],
            "perplexity": ours["perplexity"],
            "perplexity_docs": ours["perplexity_docs"],
            "seconds": ours["cold_s"],
            "compile_s": ours["compile_s"],
        },
        {
            **base,
            "library": "viax SVI (rerun: compiled programs on disk)",
            "docs_per_s": n / ours["rerun_s"],
            "perplexity": ours["perplexity"],
            "perplexity_docs": ours["perplexity_docs"],
            "seconds": ours["rerun_s"],
        },
        {
            **base,
            "library": "sklearn online",
            "docs_per_s": n / sk["s"],
            "perplexity": sk["perplexity"],
            "perplexity_docs": sk["perplexity_docs"],
            "seconds": sk["s"],
            **({"sklearn_own_perplexity": sk["sklearn_own_perplexity"]} if own_perplexity else {}),
        },
        {
            **base,
            "library": "gensim LdaModel",
            "docs_per_s": n / gs["s"],
            "perplexity": gs["perplexity"],
            "perplexity_docs": gs["perplexity_docs"],
            "seconds": gs["s"],
        },
    ]


def seed_spread(X: sp.csr_matrix, seeds=(0, 1, 2)) -> dict:
    """Held-out perplexity (sklearn's bound) of each library over seeds: one pass over a
    few thousand documents does not forget its random start λ0.  The three libraries
    draw λ0 ~ Gamma(100, 1/100) from numpy's RandomState(seed) alike (gensim adds η), so
    each seed is a paired comparison."""
    train, held_out = split(X)
    spread = {"viax": [], "sklearn": [], "gensim": []}
    for seed in seeds:
        spread["viax"].append(run_viax(train, held_out, seed, 0)["perplexity"][0])
        spread["sklearn"].append(run_sklearn(train, held_out, False, seed, 1)["perplexity"][0])
        spread["gensim"].append(run_gensim(train, held_out, seed, 1)["perplexity"][0])
        print(" seed", seed, {k: round(v[-1], 1) for k, v in spread.items()}, flush=True)
    return {"seeds": list(seeds), **spread}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="NYT, 2,000 training docs")
    args = parser.parse_args(argv)
    rows, spread = [], None
    if DATA.exists():
        X = load_ldac(DATA)
        if args.quick:
            X = X[:2222]
        rows += bench("NYT", X, own_perplexity=True)
        spread = None if args.quick else seed_spread(X)
    else:
        print(f"NYT data not found at {DATA}: skipped", flush=True)
    if not args.quick:
        rows += bench("synthetic 10^5", synthetic(10**5), own_perplexity=False)
    payload = {
        "command": "python benchmarks/conjugate_lda.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {jax.device_count()} JAX CPU device(s), "
        f"{os.cpu_count()} cores",
        "jax": jax.__version__,
        "note": (
            "Perplexities of all three libraries are computed by the same code on the same "
            "held-out documents (sklearn's bound); lower is better."
            + (
                " NYT held-out perplexity (sklearn's bound) with seeds "
                + ", ".join(map(str, spread["seeds"]))
                + " (the same seed starts all three from the same topics λ0): "
                + "; ".join(
                    f"{name} "
                    + " / ".join(f"{v:.0f}" for v in values)
                    + f" (mean {np.mean(values):.0f})"
                    for name, values in spread.items()
                    if name != "seeds"
                )
                + "."
                if spread
                else ""
            )
        ),
        "nyt_perplexity_by_seed": spread,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "conjugate_lda.json").write_text(json.dumps(payload, indent=2))
    from conjugate_gmm import write_markdown

    write_markdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
