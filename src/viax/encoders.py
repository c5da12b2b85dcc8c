"""Encoders: amortized Gaussian posteriors q(z_n | x_n) for the local latents of a data plate.

An encoder maps the data of one row, x_n (input_dim,), to the parameters of a Gaussian
over that row's unconstrained local latents (dim k):

* ``covariance="diagonal"``: q(z_n | x_n) = N(m(x_n), diag(s(x_n)²)), the network's
  output is (m, log s), 2k numbers;
* ``covariance="fullrank"``: q(z_n | x_n) = N(m(x_n), L(x_n) L(x_n)ᵀ) with L lower
  triangular, diag(L) = exp(·): k + k(k+1)/2 numbers (a Cholesky output).

Amortization (Gershman & Goodman 2014; Kingma & Welling 2014) replaces N sets of local
variational parameters by one network, so q for a new row costs one forward pass: the
held-out evidence of :meth:`viax.Result.log_evidence` relies on it.

An encoder is a small frozen value with pure functions ``init(rng_key, input_dim,
output_dim) -> params`` and ``apply(params, x) -> outputs``, so any object with those
two methods (an equinox module through :class:`ModuleEncoder`) can stand in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["MLPEncoder", "ModuleEncoder", "num_outputs"]

_ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "gelu": jax.nn.gelu,
    "elu": jax.nn.elu,
}
COVARIANCES = ("diagonal", "fullrank")


def num_outputs(covariance: str, dim: int) -> int:
    """Outputs an encoder needs for a Gaussian over ``dim`` latents."""
    return 2 * dim if covariance == "diagonal" else dim + dim * (dim + 1) // 2


def _check_covariance(covariance):
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")


@dataclass(frozen=True)
class MLPEncoder:
    """A multilayer perceptron in pure JAX: ``x -> act(W_1 x + b_1) -> … -> W_out h + b_out``.

    Args:
        hidden_sizes: widths of the hidden layers; ``()`` gives an affine encoder (enough
            for a linear-Gaussian model such as probabilistic PCA, whose exact posterior
            mean is linear in x).
        activation: ``"tanh"``, ``"relu"``, ``"softplus"``, ``"gelu"``, ``"elu"`` or a
            callable.
        covariance: ``"diagonal"`` or ``"fullrank"`` (see the module docstring).
        data_keys: which data arrays the encoder reads (one row per plate element);
            ``None``: every data array with one row per element of the data plate.
        init_log_scale: bias of the log-scale outputs at the start (scale e^b).

    viax feeds the encoder standardised inputs (the training rows' mean and sd per
    feature).  Weights start as LeCun-normal (variance 1/fan-in), biases at zero, the output layer
    scaled by 0.01 so that q starts near N(0, e^{2b} I) whatever the data.

    Example:
        >>> encoder = MLPEncoder(hidden_sizes=(200, 200), activation="tanh")
    """

    hidden_sizes: tuple[int, ...] = (200, 200)
    activation: str | Callable = "tanh"
    covariance: str = "diagonal"
    data_keys: tuple[str, ...] | None = None
    init_log_scale: float = 0.0

    def __post_init__(self):
        sizes = tuple(self.hidden_sizes)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes!r}")
        object.__setattr__(self, "hidden_sizes", sizes)
        if isinstance(self.activation, str) and self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; use one of "
                f"{', '.join(_ACTIVATIONS)} or a callable"
            )
        if not isinstance(self.activation, str) and not callable(self.activation):
            raise ValueError(f"activation must be a name or a callable, got {self.activation!r}")
        _check_covariance(self.covariance)
        if self.data_keys is not None:
            object.__setattr__(self, "data_keys", tuple(self.data_keys))

    def _act(self):
        return (
            _ACTIVATIONS[self.activation] if isinstance(self.activation, str) else self.activation
        )

    def init(self, rng_key: jax.Array, input_dim: int, output_dim: int) -> list[dict[str, Any]]:
        """Layer parameters ``[{"w": (fan_in, fan_out), "b": (fan_out,)}, …]``."""
        sizes = (input_dim, *self.hidden_sizes, output_dim)
        keys = jax.random.split(rng_key, len(sizes) - 1)
        layers = []
        for i, (key, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
            w = jax.random.normal(key, (fan_in, fan_out)) / jnp.sqrt(max(fan_in, 1))
            if i == len(sizes) - 2:
                w = 0.01 * w
            layers.append({"w": w, "b": jnp.zeros(fan_out)})
        return layers

    def apply(self, params: list[dict[str, Any]], x: jax.Array) -> jax.Array:
        """Outputs (..., output_dim) for inputs (..., input_dim)."""
        act = self._act()
        h = x
        for layer in params[:-1]:
            h = act(h @ layer["w"] + layer["b"])
        return h @ params[-1]["w"] + params[-1]["b"]


@dataclass(frozen=True, eq=False)
class ModuleEncoder:
    """A user's network as an encoder: an equinox module mapping one row (input_dim,) to
    the Gaussian's outputs (``num_outputs(covariance, k)``,).  Its inexact arrays are the
    trained parameters (``equinox.partition``)."""

    module: Any
    covariance: str = "diagonal"
    data_keys: tuple[str, ...] | None = None
    init_log_scale: float = 0.0

    def __post_init__(self):
        _check_covariance(self.covariance)
        if not callable(self.module):
            raise ValueError(f"ModuleEncoder needs a callable module, got {self.module!r}")

    def _split(self):
        import equinox as eqx

        return eqx.partition(self.module, eqx.is_inexact_array)

    def init(self, rng_key, input_dim: int, output_dim: int):
        del rng_key, input_dim, output_dim  # the module comes initialised
        return self._split()[0]

    def apply(self, params, x):
        import equinox as eqx

        net = eqx.combine(params, self._split()[1])
        flat = x.reshape(-1, x.shape[-1])
        return jax.vmap(net)(flat).reshape(*x.shape[:-1], -1)
