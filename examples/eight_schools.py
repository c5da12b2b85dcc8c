"""Eight schools, non-centred (Rubin 1981; Gelman et al., BDA3 §5.5).

viax fit examples/eight_schools.py --data examples/data/eight_schools.json --family fullrank
"""

import numpyro
import numpyro.distributions as dist


def model(J, y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", J):
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0, 1))
        theta = numpyro.deterministic("theta", mu + tau * theta_trans)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


if __name__ == "__main__":
    import json
    from pathlib import Path

    import viax

    data = json.loads((Path(__file__).parent / "data" / "eight_schools.json").read_text())
    result = viax.fit(model, data, family="fullrank", seed=0)
    print(result)
    print(result.summary().round(2))
