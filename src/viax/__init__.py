"""viax: variational inference on JAX.

Importing viax turns on JAX's float64 mode: ill-conditioned posteriors (unscaled
regressions) need it, and Stan and PyMC work in float64 too.  It also keeps compiled
programs on disk (:mod:`viax.cache`; ``VIAX_CACHE_DIR=off`` turns that off), so a
fresh process refits a model it has seen without compiling.
"""

import jax

jax.config.update("jax_enable_x64", True)

from viax import cache  # noqa: E402

cache._enable_on_import()

from viax import conjugate, data, diagnostics  # noqa: E402
from viax.conjugate import cavi, naive, svi  # noqa: E402
from viax.diagnostics import Evidence, khat_verdict  # noqa: E402
from viax.encoders import MLPEncoder, ModuleEncoder  # noqa: E402
from viax.estimators.objectives import ELBO, IWAE  # noqa: E402
from viax.families import FAMILIES, FullRank, LowRank, MeanField, make_family  # noqa: E402
from viax.fit import METHODS, OPTIMIZERS, fit  # noqa: E402
from viax.infer.advi import scale_by_stan_advi, stan_advi  # noqa: E402
from viax.infer.bbvi import gradient_variance  # noqa: E402
from viax.infer.driver import DivergenceError  # noqa: E402
from viax.infer.learn import EarlyStopping, RowEvidence  # noqa: E402
from viax.model import Model, ModelError  # noqa: E402
from viax.result import Result  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "METHODS",
    "OPTIMIZERS",
    "DivergenceError",
    "ELBO",
    "EarlyStopping",
    "Evidence",
    "FullRank",
    "IWAE",
    "LowRank",
    "MLPEncoder",
    "MeanField",
    "Model",
    "ModelError",
    "ModuleEncoder",
    "Result",
    "RowEvidence",
    "cache",
    "cavi",
    "conjugate",
    "data",
    "diagnostics",
    "fit",
    "gradient_variance",
    "khat_verdict",
    "make_family",
    "naive",
    "scale_by_stan_advi",
    "stan_advi",
    "svi",
]
