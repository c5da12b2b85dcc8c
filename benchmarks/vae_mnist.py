"""VAE on MNIST, viax against NumPyro's SVI in the same run; PPCA against scikit-learn.

VAE (Burda, Grosse & Salakhutdinov 2016, one stochastic layer): encoder and decoder
each two tanh layers of 200 units, 50 latents, Bernoulli likelihood; dynamic
binarization (a fresh Bernoulli draw per pixel per batch) of the 50,000 training
images.  viax: ``viax.fit`` path ``fit_learn`` with ``viax.MLPEncoder`` and the
objective given (ELBO with one draw, or IWAE K); NumPyro: ``SVI(model, guide,
optax_to_numpyro(adam), Trace_ELBO())`` with the same networks (equinox modules through
``numpyro.contrib.module.eqx_module``), optimiser, batch size and epochs, a jitted
``svi.update`` per batch as NumPyro's examples do.  Test NLL: importance sampling with
k draws of each library's own encoder per test image (a fixed binarization of the test
set, seed 0), the same estimator for both, with its standard error.

PPCA: viax's maximum-likelihood PPCA (params W, μ, σ, full-batch L-BFGS, affine
encoder) on the
scikit-learn digits against ``PCA(n_components=q).score`` (the average PPCA
log-likelihood at the closed-form fit, Tipping & Bishop 1999).

    python benchmarks/vae_mnist.py --epochs 8 --test-rows 500 --k 5000

Writes benchmarks/results/vae_mnist.json and .md.
"""

from __future__ import annotations

import argparse
import os
import time

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax.scipy.special import logsumexp
from numpyro.contrib.module import eqx_module

import viax
from viax.infer.learn import dynamic_binarization, fit_learn

LATENT, HIDDEN, PIXELS = 50, 200, 784


def load_mnist(dtype=np.float64):
    data = np.load(_common.SHARED_DATA_DIR / "mnist" / "mnist.npz")
    return (data["x_train"] / 255.0).astype(dtype), (data["x_test"] / 255.0).astype(dtype)


def _mlp(inputs, outputs, seed, dtype):
    return eqx.nn.MLP(
        inputs,
        outputs,
        HIDDEN,
        depth=2,
        activation=jnp.tanh,
        key=jax.random.PRNGKey(seed),
        dtype=dtype,
    )


def make_vae(dtype=jnp.float64):
    """The model and NumPyro's guide, networks (equinox) in ``dtype``: (vae, guide,
    decoder module, encoder module)."""
    decoder_net = _mlp(LATENT, PIXELS, 1, dtype)
    encoder_net = _mlp(PIXELS, 2 * LATENT, 2, dtype)

    def vae(x):
        decoder = eqx_module("decoder", decoder_net)
        with numpyro.plate("rows", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=jax.vmap(decoder)(z)).to_event(1), obs=x)

    def guide(x):
        encoder = eqx_module("encoder", encoder_net)
        out = jax.vmap(encoder)(x)
        with numpyro.plate("rows", x.shape[0]):
            numpyro.sample("z", dist.Normal(out[:, :LATENT], jnp.exp(out[:, LATENT:])).to_event(1))

    return vae, guide, decoder_net, encoder_net


def is_nll(decoder_params, decoder_net, encode_fn, x_test, k, seed=0, rows_per_chunk=50, draws=500):
    """Per-row −log p(x) by importance sampling with k draws of q(z | x): mean and se
    (over rows) of −log (1/k) Σ p(x, z_k)/q(z_k | x)."""
    decoder = eqx.combine(decoder_params, eqx.partition(decoder_net, eqx.is_inexact_array)[1])

    @jax.jit
    def chunk(x, key):
        loc, log_scale = encode_fn(x)  # (R, L)
        eps = jax.random.normal(key, (draws, *loc.shape))
        z = loc + jnp.exp(log_scale) * eps
        logits = jax.vmap(jax.vmap(decoder))(z)
        log_lik = jnp.sum(x * logits - jnp.logaddexp(0.0, logits), axis=-1)
        log_prior = jnp.sum(-0.5 * z**2 - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
        log_q = jnp.sum(-0.5 * eps**2 - log_scale - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
        return log_lik + log_prior - log_q  # (draws, R)

    key = jax.random.PRNGKey(seed)
    out = []
    for start in range(0, len(x_test), rows_per_chunk):
        x = jnp.asarray(x_test[start : start + rows_per_chunk])
        parts = []
        for _ in range(-(-k // draws)):
            key, sub = jax.random.split(key)
            parts.append(np.asarray(chunk(x, sub)))
        lw = np.concatenate(parts)[:k]
        out.append(-(logsumexp(lw, axis=0) - np.log(k)))
    nll = np.concatenate(out)
    return float(nll.mean()), float(nll.std(ddof=1) / np.sqrt(nll.size))


def run_viax(x_train, objective, epochs, batch_size, lr, seed, x_test, k):
    """viax's fit and its held-out estimate: (row, result)."""
    vae = make_vae(x_train.dtype)[0]
    start = time.perf_counter()
    result = fit_learn(
        vae,
        {"x": x_train},
        encoder=viax.MLPEncoder(hidden_sizes=(HIDDEN, HIDDEN), activation="tanh"),
        objective=objective,
        batch_size=batch_size,
        num_epochs=epochs,
        optimizer=optax.adam(lr),
        transform_batch=dynamic_binarization,
        seed=seed,
        progress=False,
    )
    total = time.perf_counter() - start
    # The library's own held-out estimate (what a user calls): per row L_k with k draws of
    # the encoder, the same estimator as is_nll (log of the mean of k importance weights).
    t0 = time.perf_counter()
    evidence = result.log_evidence(data={"x": x_test}, num_samples=k, seed=0)
    nll_rows = -evidence.iwae_rows
    row = {
        "seconds_per_epoch": result.info["seconds_per_step"] * result.info["steps_per_epoch"],
        "train_seconds": result.wall_time,
        "total_seconds": total,
        "test_nll": float(nll_rows.mean()),
        "test_nll_se": float(nll_rows.std(ddof=1) / np.sqrt(nll_rows.size)),
        "nll_seconds": time.perf_counter() - t0,
        "epoch_objective_per_row": (result.info["epoch_objective"] / len(x_train)).tolist(),
    }
    return row, result


def run_numpyro(x_train, epochs, batch_size, lr, seed, x_test, k):
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import optax_to_numpyro

    vae, guide, decoder_net, encoder_net = make_vae(x_train.dtype)
    svi = SVI(vae, guide, optax_to_numpyro(optax.adam(lr)), Trace_ELBO())
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    state = svi.init(
        jax.random.PRNGKey(seed), x=jnp.asarray(x_train[:batch_size] > 0.5, x_train.dtype)
    )

    @jax.jit
    def update(state, x, key):
        x = (jax.random.uniform(key, x.shape, x.dtype) < x).astype(x.dtype)  # dynamic binarization
        return svi.update(state, x=x)

    steps = len(x_train) // batch_size
    epoch_times, losses = [], []
    key = jax.random.PRNGKey(seed + 1)
    for _ in range(epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(x_train))
        total = 0.0
        for i in range(steps):
            key, sub = jax.random.split(key)
            state, loss = update(
                state, jnp.asarray(x_train[order[i * batch_size : (i + 1) * batch_size]]), sub
            )
            total += float(loss)
        epoch_times.append(time.perf_counter() - t0)
        losses.append(-total / (steps * batch_size))
    train = time.perf_counter() - start
    params = svi.get_params(state)
    enc = eqx.combine(params["encoder$params"], eqx.partition(encoder_net, eqx.is_inexact_array)[1])

    def encode(x):
        out = jax.vmap(enc)(x)
        return out[:, :LATENT], out[:, LATENT:]

    t0 = time.perf_counter()
    nll = is_nll(params["decoder$params"], decoder_net, encode, x_test, k)
    return {
        # The first epoch pays for compilation: the median of the others.
        "seconds_per_epoch": float(np.median(epoch_times[1:])) if epochs > 1 else epoch_times[0],
        "train_seconds": train,
        "total_seconds": train,
        "test_nll": nll[0],
        "test_nll_se": nll[1],
        "nll_seconds": time.perf_counter() - t0,
        "epoch_objective_per_row": losses,
    }


def ppca_rows(components):
    from ppca import ppca
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    x = load_digits().data.astype(float)
    x = x[:, x.std(0) > 0]  # constant pixels have no noise variance to learn
    rows = []
    for q in components:
        start = time.perf_counter()
        # Amortized (affine encoder) full batch: per-row moment-matched fixed draws make
        # the fixed-draw ELBO exact with 64 draws whatever the number of rows.
        # Per-row matching needs only q + 2 draws to be exact for this quadratic model.
        result = viax.fit(
            ppca,
            {"x": x, "q": q},
            # Full-rank q(z_n | x_n): the exact posterior's family, so the bound is tight
            # for any rotation of W (a diagonal q pushes W's columns towards
            # orthogonality along a direction of curvature ~0.03, which L-BFGS crawls
            # along: 1,360 steps against 680 on q = 2).
            encoder=viax.MLPEncoder(hidden_sizes=(), covariance="fullrank"),
            num_draws=q + 4,
            progress=False,
        )
        seconds = time.perf_counter() - start
        w, mu, sigma = (result.model_params[k] for k in ("W", "mu", "sigma"))
        cov = w @ w.T + sigma**2 * np.eye(x.shape[1])
        from scipy.stats import multivariate_normal

        viax_ll = float(multivariate_normal(mu, cov).logpdf(x).mean())
        t0 = time.perf_counter()
        pca = PCA(n_components=q).fit(x)
        sk_seconds = time.perf_counter() - t0
        rows.append(
            {
                "q": q,
                "viax_loglik_per_row": viax_ll,
                "viax_elbo_per_row": result.elbo / len(x),
                "sklearn_score": float(pca.score(x)),
                "viax_sigma2": float(sigma**2),
                "sklearn_noise_variance": float(pca.noise_variance_),
                "viax_seconds": seconds,
                "sklearn_seconds": sk_seconds,
                "converged": bool(result.converged),
            }
        )
        print(rows[-1], flush=True)
    return rows


# Burda, Grosse & Salakhutdinov (2016), Table 1, one stochastic layer, 3,280 epochs.
ANCHORS = {"ELBO": 86.76, "IWAE": 84.78}


def extrapolate(row: dict, anchor: float):
    """Epochs until the test NLL would be within 1 nat of ``anchor``, from a power law
    fitted to the training objective per epoch (epochs ≥ 2):  −objective(e) ≈ y∞ + a e^(−b),
    with the test NLL assumed to stay the measured offset from −objective at the last
    epoch.  Crude: a few epochs of a 3,280-epoch schedule.  Returns (epochs or None,
    asymptote of the test NLL) or None when there are too few epochs to fit (under 6)."""
    from scipy.optimize import curve_fit

    y = -np.asarray(row.get("epoch_objective_per_row", []), dtype=float)
    # Three parameters fitted to epochs 2…E: fewer than five points leave at most one
    # degree of freedom, and a 4-epoch IWAE-50 run gave an asymptote of −10.8 nats.
    if y.size < 6:
        return None
    epochs = np.arange(1, y.size + 1, dtype=float)
    e, v = epochs[1:], y[1:]
    try:
        (y_inf, a, b), _ = curve_fit(
            lambda t, y_inf, a, b: y_inf + a * t ** (-b),
            e,
            v,
            p0=(v[-1] - 5.0, max(v[0] - v[-1], 1.0) * 2.0, 0.5),
            bounds=([0.0, 0.0, 0.01], [np.inf, np.inf, 5.0]),
            maxfev=20000,
        )
    except RuntimeError:
        return None
    offset = row["test_nll"] - y[-1]  # test NLL − (−training objective) at the last epoch
    asymptote = y_inf + offset
    goal = anchor + 1.0 - offset - y_inf
    if goal <= 0:
        return None, asymptote
    return float((goal / a) ** (-1.0 / b)), asymptote


def render(payload) -> str:
    """The markdown page from the sections present (each run may redo one section)."""
    lines = ["# VAE on MNIST and PPCA on digits\n"]
    vae = payload.get("vae")
    if vae:
        a = vae["args"]
        lines.append(
            f"VAE, {a['epochs']} epochs of {a.get('train_rows', 50000)} training images, batch "
            f"{a['batch_size']}, Adam {a['lr']}, {a.get('dtype', 'float64')} for both libraries; "
            f"test NLL by IS with k={a['k']} draws of each run's encoder on the first "
            f"{a['test_rows']} test images (one fixed binarization). {vae['date']}, "
            f"{vae['machine'].get('cpu_count', '?')} CPUs, jax {vae['machine'].get('jax', '?')}, "
            f"numpyro {vae['machine'].get('numpyro', '?')}; command: `{vae['command']}`. "
            "The machine was shared with other jobs (1-minute load average at the start and "
            f"end of the run: {vae.get('load_average', '?')} on 2 cores): compare the runs of "
            "one table with each other only, not with timings taken elsewhere; the runs "
            "are sequential, so their ratios also carry the load's drift (repeat numpyro in "
            "--runs to bracket viax's runs in time).\n"
        )
        lines.append(
            _common.markdown_table(
                [
                    "run",
                    "s / epoch (steady)",
                    "train s (compile incl.)",
                    "total s (with final estimates)",
                    "test NLL (nats)",
                ],
                [
                    [
                        r["run"],
                        f"{r['seconds_per_epoch']:.2f}",
                        f"{r.get('train_seconds', r['total_seconds']):.1f}",
                        f"{r['total_seconds']:.1f}",
                        f"{r['test_nll']:.2f} ± {r['test_nll_se']:.2f}",
                    ]
                    for r in vae["runs"]
                ],
            )
        )
        lines.append(
            "\nExtrapolation to Burda et al.'s anchors (test NLL 86.76 nats for the VAE, "
            "84.78 for IWAE K=50, after 3,280 epochs): a power law y∞ + a·e^(−b) fitted to "
            "−(training objective per row) over epochs 2…E, shifted by the measured gap "
            "between the test NLL and −objective at epoch E. A few epochs say little about "
            "epoch 3,280: read these as orders of magnitude.\n"
        )
        extrapolated = []
        for r in vae["runs"]:
            anchor = ANCHORS["IWAE" if "IWAE" in r["run"] else "ELBO"]
            got = extrapolate(r, anchor)
            if got is None:
                extrapolated.append([r["run"], anchor, "too few epochs", ""])
                continue
            epochs, asymptote = got
            extrapolated.append(
                [
                    r["run"],
                    anchor,
                    f"{epochs:,.0f}" if epochs is not None else "not reached",
                    f"{asymptote:.1f}",
                ]
            )
        lines.append(
            _common.markdown_table(
                ["run", "anchor (nats)", "epochs to anchor + 1 nat", "fitted asymptote"],
                extrapolated,
            )
        )
        curves = [r for r in vae["runs"] if r.get("epoch_objective_per_row")]
        if curves:
            lines.append(
                "\nTraining objective per row by epoch (the mean of the epoch's minibatch "
                "estimates, binarized training rows):\n"
            )
            epochs = max(len(r["epoch_objective_per_row"]) for r in curves)
            lines.append(
                _common.markdown_table(
                    ["epoch", *(r["run"] for r in curves)],
                    [
                        [e + 1]
                        + [
                            f"{r['epoch_objective_per_row'][e]:.2f}"
                            if e < len(r["epoch_objective_per_row"])
                            else ""
                            for r in curves
                        ]
                        for e in range(epochs)
                    ],
                )
            )
    ppca = payload.get("ppca")
    if ppca:
        lines.append(
            "\nPPCA on scikit-learn digits (1797 rows, 61 non-constant pixels); "
            f"{ppca['date']}; command: `{ppca['command']}`. viax: full-batch L-BFGS on "
            "fixed draws, affine full-rank encoder; converged: "
            f"{', '.join(str(r.get('converged')) for r in ppca['rows'])}. sklearn's σ² "
            "divides by n − 1, viax's (the maximum-likelihood one) by n. Shared machine: "
            "the seconds are inflated by other jobs.\n"
        )
        header = ["q", "viax log-lik / row", "viax ELBO / row", "sklearn PCA.score"]
        header += ["viax σ²", "sklearn σ²", "viax s", "sklearn s"]
        lines.append(
            _common.markdown_table(
                header,
                [
                    [
                        r["q"],
                        f"{r['viax_loglik_per_row']:.4f}",
                        f"{r['viax_elbo_per_row']:.4f}",
                        f"{r['sklearn_score']:.4f}",
                        f"{r['viax_sigma2']:.4f}",
                        f"{r['sklearn_noise_variance']:.4f}",
                        f"{r['viax_seconds']:.1f}",
                        f"{r['sklearn_seconds']:.3f}",
                    ]
                    for r in ppca["rows"]
                ],
            )
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-rows", type=int, default=500)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--iwae", type=int, default=5, help="K of the viax IWAE run")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["numpyro", "elbo"],
        choices=["numpyro", "elbo", "iwae"],
        help="which runs, in this order (repeat numpyro to bracket viax's runs in time)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--train-rows", type=int, default=50_000)
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--skip-ppca", action="store_true")
    parser.add_argument("--ppca-components", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument(
        "--name",
        default="vae_mnist",
        help="results file stem in benchmarks/results (e.g. a bracketed timing run)",
    )
    args = parser.parse_args()
    payload = _common.read_json(f"{args.name}.json") or {}
    if args.render_only:
        (_common.RESULTS_DIR / f"{args.name}.md").write_text(render(payload))
        return
    stamp = {
        "command": _common.command_line(),
        "date": _common.today(),
        "machine": _common.machine(),
        "args": vars(args),
    }
    if not args.skip_vae:
        load = os.getloadavg()[0]
        dtype = np.dtype(args.dtype)
        x_train, x_test = load_mnist(dtype)
        x_train = x_train[: args.train_rows]
        x_test = (np.random.default_rng(0).uniform(size=x_test.shape) < x_test).astype(dtype)
        x_test = x_test[: args.test_rows]
        runs = []
        for name in args.runs:
            common = (x_train, args.epochs, args.batch_size, args.lr, args.seed, x_test, args.k)
            if name == "numpyro":
                row = {"run": "NumPyro SVI Trace_ELBO", **run_numpyro(*common)}
            elif name == "elbo":
                row = {"run": "viax ELBO", **run_viax(x_train, viax.ELBO(), *common[1:])[0]}
            else:
                objective = viax.IWAE(args.iwae)
                row = {
                    "run": f"viax IWAE K={args.iwae} (DReG)",
                    **run_viax(x_train, objective, *common[1:])[0],
                }
            print({k: v for k, v in row.items() if k != "epoch_objective_per_row"}, flush=True)
            runs.append(row)
        payload["vae"] = {
            **stamp,
            "runs": runs,
            "load_average": f"{load:.1f}, {os.getloadavg()[0]:.1f}",
        }
    if not args.skip_ppca:
        payload["ppca"] = {**stamp, "rows": ppca_rows(args.ppca_components)}
    # Re-read before writing: another run may have written the other section meanwhile.
    payload = {
        **(_common.read_json(f"{args.name}.json") or {}),
        **{
            k: v
            for k, v in payload.items()
            if k in ("vae", "ppca")
            and ((k == "vae" and not args.skip_vae) or (k == "ppca" and not args.skip_ppca))
        },
    }
    _common.write_json(f"{args.name}.json", payload)
    text = render(payload)
    (_common.RESULTS_DIR / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
