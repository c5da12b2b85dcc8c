"""Bayesian logistic regression on the Wisconsin breast-cancer data (569 x 30).

    y_n ~ Bernoulli(sigmoid(b + x_n . w)),   w_j ~ N(0, 1),   b ~ N(0, 1),

with the 30 predictors standardised (mean 0, sd 1), so a unit prior is weakly
informative on the log-odds scale.  The data ship with scikit-learn
(``sklearn.datasets.load_breast_cancer``; UCI, Wolberg et al. 1995): nothing is
downloaded.

    python examples/logistic_regression.py
"""

import numpy as np
import numpyro
import numpyro.distributions as dist


def model(X, y=None):
    num_features = X.shape[-1]
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([num_features]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Bernoulli(logits=X @ w + b).to_event(1), obs=y)


def load_data() -> dict[str, np.ndarray]:
    """``{"X": (569, 30) standardised float64, "y": (569,) 0/1 int}``; y = 1 is benign."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return {"X": X.astype(np.float64), "y": y.astype(np.int64)}


if __name__ == "__main__":
    import viax

    result = viax.fit(model, load_data(), family="fullrank", seed=0)
    print(result)
    print(result.summary().round(2))
