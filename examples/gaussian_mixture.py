"""A Bayesian Gaussian mixture fitted by CAVI, SVI or the naive closed-form ELBO.

    viax fit examples/gaussian_mixture.py --data points.npz --method cavi --out runs/gmm

For the conjugate methods (``--method cavi``, ``svi`` or ``naive``) the model file's
``model`` takes the data's keys and returns ``(conjugate model, data to fit)``; here
sklearn's BayesianGaussianMixture priors (``GaussianMixtureModel.from_data``) with a
Dirichlet-process weight prior truncated at ``n_components``.
"""

import numpy as np

from viax.conjugate import GaussianMixtureModel


def model(X, n_components=5, **kwargs):
    X = np.asarray(X, dtype=float)
    gmm = GaussianMixtureModel.from_data(
        X, n_components=int(n_components), weight_concentration_prior_type="dirichlet_process"
    )
    return gmm, X
