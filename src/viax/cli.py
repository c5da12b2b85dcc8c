"""The ``viax`` command: a thin shell over :func:`viax.fit`.

viax fit MODEL.py --data DATA.json --family fullrank --out runs/NAME
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
import zipfile
from pathlib import Path

import click
import numpy as np


def load_model(path: str | Path, name: str = "model"):
    """The function ``name`` from the Python file ``path``."""
    path = Path(path)
    if not path.is_file():
        raise click.BadParameter(f"no such model file: {path}", param_hint="MODEL_FILE")
    spec = importlib.util.spec_from_file_location(f"viax_user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise click.BadParameter(
            f"{path} defines no function {name!r} (use --model NAME)", param_hint="--model"
        )
    return getattr(module, name)


def load_data(path: str | Path | None) -> dict:
    """Stan-style JSON (posteriordb) or ``.npz``; lists become arrays in :func:`viax.fit`."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise click.BadParameter(f"no such data file: {path}", param_hint="--data")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise click.BadParameter(
                f"{path}: not a readable .npz archive of plain arrays ({type(err).__name__})",
                param_hint="--data",
            ) from None
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise click.BadParameter(
                f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}",
                param_hint="--data",
            ) from None
        except UnicodeDecodeError as err:
            raise click.BadParameter(f"{path}: not UTF-8 ({err})", param_hint="--data") from None
        if not isinstance(data, dict):
            raise click.BadParameter(f"{path}: expected a JSON object", param_hint="--data")
        return data
    raise click.BadParameter(f"{path}: data must be .json or .npz", param_hint="--data")


@click.group()
@click.version_option(package_name="viax")
def main():
    """viax: variational inference on JAX."""


@main.command("fit")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--data", "data_file", type=click.Path(dir_okay=False), help="JSON or .npz data.")
@click.option(
    "--model",
    "model_name",
    default="model",
    show_default=True,
    help="Name of the model function in MODEL_FILE.",
)
@click.option(
    "--method",
    default="advi",
    show_default=True,
    help="advi or bbvi for a NumPyro model; cavi, svi or naive for a conjugate model "
    "(then MODEL_FILE's model returns (conjugate model, data to fit)).",
)
@click.option(
    "--family", default="meanfield", show_default=True, help="meanfield, fullrank or lowrank."
)
@click.option(
    "--rank", type=click.IntRange(min=1), default=None, help="Rank of the lowrank family."
)
@click.option(
    "--optimizer",
    default="dadvi",
    show_default=True,
    help="dadvi (robust default) or stan (Stan's stochastic ADVI).",
)
@click.option(
    "--num-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Maximum number of steps (cavi: sweeps; svi: passes over the data).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="svi minibatch.",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=2),
    default=1000,
    show_default=True,
    help="Draws for the summary and posterior.nc.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write summary.csv, elbo.png and posterior.nc here.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--checkpoint",
    "checkpoint_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="cavi, svi, naive: write a checkpoint here as the run goes (atomic .npz).",
)
@click.option(
    "--resume", is_flag=True, help="cavi, svi, naive: continue from the --checkpoint file."
)
def fit_command(
    model_file,
    data_file,
    model_name,
    method,
    family,
    rank,
    optimizer,
    num_steps,
    batch_size,
    num_samples,
    seed,
    out_dir,
    no_progress,
    checkpoint_path,
    resume,
):
    """Fit MODEL_FILE's model to the data and report the posterior approximation."""
    import pandas as pd

    import viax

    if (checkpoint_path or resume) and method not in CONJUGATE_METHODS:
        raise click.BadParameter(
            f"checkpoints are for {', '.join(CONJUGATE_METHODS)}, not --method {method}",
            param_hint="--checkpoint",
        )
    if resume and checkpoint_path is None:
        raise click.BadParameter("--resume needs --checkpoint PATH", param_hint="--resume")
    model = load_model(model_file, model_name)
    data = load_data(data_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            if method in CONJUGATE_METHODS:
                result = fit_conjugate(
                    model,
                    data,
                    method,
                    num_steps,
                    batch_size,
                    seed,
                    not no_progress,
                    checkpoint_path=checkpoint_path,
                    resume=resume,
                )
            else:
                result = viax.fit(
                    model,
                    data,
                    method=method,
                    family=family,
                    rank=rank,
                    optimizer=optimizer,
                    num_steps=num_steps,
                    seed=seed,
                    progress=not no_progress,
                )
        except (ValueError, TypeError, viax.DivergenceError, FloatingPointError, OSError) as err:
            # Checkpoint and data errors included: the message, not click's "Aborted!"
            # (which is all an EOFError would print).
            raise click.ClickException(str(err)) from err
    for w in caught:
        if "k-hat" not in str(w.message) and "did not converge" not in str(w.message):
            click.secho(f"warning: {w.message}", fg="yellow", err=True)
    summary = result.summary(num_samples=num_samples, seed=seed)
    diagnostics = result.diagnostics(seed=seed)
    with pd.option_context("display.max_rows", 200, "display.width", 120):
        click.echo(summary.round(3).to_string())
    verdict = "converged" if result.converged else "NOT CONVERGED"
    click.echo(
        f"\n{verdict}: {result.message}\n"
        f"ELBO {result.elbo:.4f} ± {result.elbo_se:.2g} after {result.num_steps} steps "
        f"({result.algorithm}, {family_name(result)}) in {result.wall_time:.2f}s "
        f"(compile {result.compile_time:.2f}s)"
    )
    mc_error = result.monte_carlo_error() if result.target is not None else None
    if mc_error is not None:
        sd = np.asarray(result.family.stddev(result.params))
        se = np.concatenate([np.ravel(mc_error[s.name]) for s in result.target.sites])
        order = np.concatenate([np.arange(s.start, s.start + s.size) for s in result.target.sites])
        click.echo(
            "DADVI Monte Carlo error of the fitted means: at most "
            f"{np.max(se / sd[order]):.3f} posterior sd (5 refits with fresh draws)"
        )
    click.echo("\n" + diagnostics.to_string())
    if not result.converged:
        click.secho(
            f"\nWARNING: the fit did NOT converge ({result.message}); do not use it as is.",
            fg="red",
            bold=True,
            err=True,
        )
    if result.khat_verdict == "do not trust" and not np.isnan(result.khat):
        click.secho(
            f"\nWARNING: PSIS k-hat = {result.khat:.2f} > 0.7: q is too far from the posterior "
            "for its draws or ELBO to be trusted (try --family fullrank).",
            fg="red",
            bold=True,
            err=True,
        )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary.to_csv(out / "summary.csv")
        result.plot_elbo(path=str(out / "elbo.png"))
        result.plot(path=str(out / "marginals.png"))
        result.to_arviz(num_samples=num_samples, seed=seed).to_netcdf(str(out / "posterior.nc"))
        write_report(out / "report.md", model_file, result, summary, diagnostics)
        click.echo(f"wrote summary.csv, elbo.png, marginals.png, posterior.nc, report.md to {out}")


CONJUGATE_METHODS = ("cavi", "svi", "naive")


def family_name(result) -> str:
    return getattr(result.family, "name", result.family)


def fit_conjugate(
    model_fn,
    data: dict,
    method: str,
    num_steps,
    batch_size: int,
    seed: int,
    progress: bool = True,
    *,
    checkpoint_path=None,
    resume: bool = False,
):
    """``model_fn(**data) -> (conjugate model, data to fit)``, fitted by ``method``,
    checkpointed to ``checkpoint_path`` (continued from it with ``resume``)."""
    import jax
    from numpyro import handlers

    from viax import conjugate

    # A NumPyro model is recognised abstractly (jax.eval_shape: nothing compiles); a
    # function that builds a conjugate model may need concrete arrays (NumPy) and fails
    # there, so it is run for real.
    tracer = handlers.trace(handlers.seed(model_fn, seed))
    try:
        jax.eval_shape(lambda: tracer(**data) and None)
    except Exception:  # noqa: BLE001  judged by the sites recorded so far
        pass
    _refuse_numpyro(tracer.trace, method)
    try:
        built = model_fn(**data)
    except Exception as err:  # noqa: BLE001  the user's function: say so, with its message
        raise click.ClickException(
            f"--method {method}: the model function raised {type(err).__name__}: {err}"
        ) from err
    if not (isinstance(built, tuple) and len(built) == 2):
        raise click.ClickException(
            f"--method {method}: the model function must return (conjugate model, data to "
            f"fit), got {type(built).__name__}"
        )
    cmodel, fit_data = built
    if not isinstance(cmodel, conjugate.ConjugateModel):
        raise click.ClickException(
            f"--method {method}: {type(cmodel).__name__} is not a viax.conjugate model"
        )
    common = dict(
        seed=seed, progress=progress, checkpoint_path=checkpoint_path, resume=resume or None
    )
    if method == "cavi":
        return conjugate.cavi(cmodel, fit_data, max_iter=num_steps or 200, **common)
    if method == "svi":
        return conjugate.svi(
            cmodel, fit_data, batch_size=batch_size, num_epochs=num_steps or 10, **common
        )
    return conjugate.naive(cmodel, fit_data, num_steps=num_steps or 5000, **common)


def _refuse_numpyro(trace, method: str) -> None:
    sites = [name for name, site in trace.items() if site["type"] == "sample"]
    if sites:
        raise click.ClickException(
            f"--method {method} takes a model function that returns (conjugate model, data "
            f"to fit); this one is a NumPyro model (sample site(s) {', '.join(sites)}): fit it "
            "with --method advi or bbvi"
        )


def write_report(path: Path, model_file, result, summary, diagnostics) -> None:
    """A markdown report: the verdicts first, then the tables and the plots."""
    verdict = "converged" if result.converged else "**NOT converged**"
    lines = [
        f"# viax fit of `{Path(model_file).name}`",
        "",
        f"- method: {result.method} / {result.algorithm}, family {family_name(result)}",
        f"- convergence: {verdict} ({result.message})",
        f"- PSIS k-hat: {result.khat:.3f}, verdict: **{result.khat_verdict}**",
        f"- ELBO: {result.elbo:.4f} ± {result.elbo_se:.2g}",
        "",
        "## Diagnostics",
        "",
        "```",
        diagnostics.to_string(),
        "```",
        "",
        "## Posterior summary",
        "",
        "```",
        summary.round(4).to_string(),
        "```",
        "",
        "## ELBO trace",
        "",
        "![ELBO trace](elbo.png)",
        "",
        "## Marginals",
        "",
        "![marginals](marginals.png)",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    main()
