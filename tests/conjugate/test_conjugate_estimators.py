"""The estimators' sklearn parameters beyond the model: sample, warm_start, verbose,
LDA's evaluate_every / perp_tol; progress bars; a diverged SVI run keeps its
checkpoint."""

import os

import numpy as np
import pytest
from test_conjugate_lda import lda_corpus

from viax.conjugate import (
    LDA,
    GaussianMixture,
    UnitVarianceMixtureModel,
    cavi,
    load_checkpoint,
    svi,
)


@pytest.fixture(scope="module")
def two_clusters():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(-3.0, 1.0, (100, 2)), rng.normal(3.0, 0.5, (100, 2))])


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_sample_is_sklearns_at_the_same_attributes(two_clusters, kind):
    from sklearn.mixture import BayesianGaussianMixture

    ours = GaussianMixture(2, covariance_type=kind, random_state=3).fit(two_clusters)
    theirs = BayesianGaussianMixture(n_components=2, covariance_type=kind, random_state=3)
    theirs.fit(two_clusters)
    theirs.weights_, theirs.means_ = ours.weights_, ours.means_
    theirs.covariances_ = ours.covariances_
    X, y = ours.sample(300)
    X_sk, y_sk = theirs.sample(300)
    assert X.shape == (300, 2)
    np.testing.assert_array_equal(y, y_sk)
    np.testing.assert_allclose(X, X_sk, rtol=1e-12)


def test_sample_follows_the_fitted_mixture(two_clusters):
    gm = GaussianMixture(2, random_state=0).fit(two_clusters)
    X, y = gm.sample(20000)
    # Each component's share is Binomial(20000, w): 5 standard errors ≈ 0.018.
    shares = np.bincount(y, minlength=2) / 20000
    np.testing.assert_allclose(shares, gm.weights_, atol=0.018)
    for k in range(2):
        draws = X[y == k]
        # Mean of ~10^4 draws of variance ≤ 1.1: 5 standard errors ≈ 0.05.
        np.testing.assert_allclose(draws.mean(0), gm.means_[k], atol=0.05)
        np.testing.assert_allclose(np.cov(draws.T), gm.covariances_[k], atol=0.1)


def test_warm_start_continues_from_the_last_fit(two_clusters):
    gm = GaussianMixture(2, warm_start=True, max_iter=3, tol=0.0, random_state=0)
    with pytest.warns(RuntimeWarning, match="did not converge in max_iter=3"):
        gm.fit(two_clusters)
    first = list(gm.lower_bounds_)
    with pytest.warns(RuntimeWarning):
        gm.fit(two_clusters)
    # The second fit's first sweep starts at the first fit's solution: it cannot be
    # below it (CAVI is monotone), whereas a fresh start would begin at first[0].
    assert gm.lower_bounds_[0] >= first[-1] - 1e-9 * abs(first[-1])
    assert gm.n_iter_ == 3
    with pytest.raises(ValueError, match="warm_start: X or the parameters changed"):
        gm.set_params(n_components=3).fit(two_clusters)


def test_verbose_prints_sweeps_and_initializations(two_clusters, capsys):
    GaussianMixture(2, verbose=2, verbose_interval=2, random_state=0).fit(two_clusters)
    out = capsys.readouterr()
    assert "Initialization 0: converged" in out.out
    assert "sweep 2\t" in out.out + out.err and "sweep 1\t" not in out.out + out.err
    GaussianMixture(2, random_state=0).fit(two_clusters)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_bars_are_optional(capsys):
    model = UnitVarianceMixtureModel.create(2, 1, 10.0)
    X = np.random.default_rng(0).normal(size=(100, 1))
    cavi(model, X, max_iter=3)
    assert "viax cavi" in capsys.readouterr().err
    cavi(model, X, max_iter=3, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("method", ["batch", "online"])
def test_lda_evaluate_every_splits_the_fit_without_changing_it(method):
    X, _ = lda_corpus(120, 60, 4, seed=0, alpha=0.3)
    kwargs = dict(learning_method=method, max_iter=4, random_state=0, batch_size=32)
    whole = LDA(4, **kwargs).fit(X)
    # perp_tol = 0: evaluated every 2 iterations, never stops early.
    split = LDA(4, evaluate_every=2, perp_tol=0.0, **kwargs).fit(X)
    np.testing.assert_allclose(split.components_, whole.components_, rtol=1e-12)
    assert split.n_iter_ == whole.n_iter_ == 4
    assert split.n_batch_iter_ == whole.n_batch_iter_
    np.testing.assert_allclose(split.elbo_trace_, whole.elbo_trace_, rtol=1e-12)


def test_lda_perp_tol_stops_when_perplexity_settles(capsys):
    X, _ = lda_corpus(120, 60, 4, seed=0, alpha=0.3)
    lda = LDA(4, max_iter=50, evaluate_every=1, perp_tol=1e9, verbose=1, random_state=0)
    lda.fit(X)
    # Any change is below 1e9: the second evaluation stops the fit.
    assert lda.n_iter_ == 2
    assert "iteration: 2 of max_iter: 50, perplexity:" in capsys.readouterr().out
    assert list(lda.get_feature_names_out()) == ["lda0", "lda1", "lda2", "lda3"]


def test_lda_result_describes_the_whole_fit():
    X, _ = lda_corpus(120, 60, 4, seed=0, alpha=0.3)
    lda = LDA(4, max_iter=6, evaluate_every=2, perp_tol=0.0, random_state=0).fit(X)
    info, message = lda.result_.info, lda.result_.message
    # Three 2-sweep blocks, each followed by an evaluation; the Result spans them all.
    assert [i for i, _ in info["perplexities"]] == [2, 4, 6]
    assert info["stopped_by"] == "max_iter" and info["blocks"] == 3
    assert lda.result_.num_steps == 6 and len(lda.elbo_trace_) == 6
    assert not lda.result_.converged
    assert message.startswith("LDA batch CAVI: 6 of max_iter=6 sweeps in 3 block(s) of up to 2")
    (_, p4), (_, p6) = info["perplexities"][1:]
    assert f"still changed by {abs(p6 - p4):.4g}" in message and "between 4 and 6 sweeps" in message
    # A tolerance above the change between the first two evaluations stops after them.
    (_, p2), (_, p4) = info["perplexities"][:2]
    early = LDA(4, max_iter=6, evaluate_every=2, perp_tol=abs(p4 - p2) * 1.01, random_state=0)
    early.fit(X)
    assert early.n_iter_ == 4 and early.result_.converged
    assert early.result_.info["stopped_by"] == "perp_tol"
    assert "4 of max_iter=6 sweeps" in early.result_.message
    assert "stopped early: the perplexity changed by" in early.result_.message


def test_lda_takes_sklearns_parameters():
    from sklearn.decomposition import LatentDirichletAllocation

    params = LatentDirichletAllocation(5, evaluate_every=3, verbose=1, n_jobs=2).get_params()
    lda = LDA(**params)
    assert {k: lda.get_params()[k] for k in params} == params
    with pytest.raises(ValueError, match="perp_tol must be >= 0"):
        LDA(perp_tol=-1.0).fit(np.ones((3, 4)))


def test_diverged_svi_names_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    model = UnitVarianceMixtureModel.create(2, 1, 10.0)
    rng = np.random.default_rng(0)

    def batches():
        for i in range(8):
            x = rng.normal(size=(20, 1))
            if i == 5:
                x[3] = 1e200  # finite, but its square overflows: step 6 diverges
            yield x

    path = os.fspath(tmp_path / "run.npz")
    with pytest.raises(FloatingPointError, match=r"non-finite at step 6.*\(step 4\)"):
        svi(
            model,
            batches(),
            num_data=160,
            batch_size=20,
            checkpoint_path=path,
            checkpoint_every=2,
            progress=False,
        )
    saved = load_checkpoint(path)
    assert saved["step"] == 4
    assert all(np.all(np.isfinite(x)) for x in saved["global_natural"]["means"])
