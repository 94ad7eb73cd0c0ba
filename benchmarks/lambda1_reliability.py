"""How often does Lanczos report lambda_2 as lambda_1? The stop rules against dense eigvalsh.

Small tanh networks (60 samples, several outputs, so the top of the spectrum clusters)
are trained with minibatch SGD and with full-batch GD up to the edge of stability, under
MSE and cross-entropy, six seeds each; the float64 dense Hessian of the whole set is formed
every 5 steps. On every Hessian whose top two eigenvalues lie 1-10% apart, our
``lanczos`` (float32 products, default ``tol=1e-3``) runs

* cold, from ``--starts`` random vectors each, and
* warm, along each run, every measurement started from the previous one's
  ``restart_vectors`` (as the monitors do),

once per stop rule, and cold also at ``tol / 10`` (what the monitors use when they have no
warm start). A measurement fails when it is more than ``1e-3`` (relative) below
:math:`\\lambda_1`: it converged to :math:`\\lambda_2` or below. The script prints the
failure rates and the products per measurement.

Run: ``.venv/bin/python benchmarks/lambda1_reliability.py`` (about 3 minutes on 2 cores).
"""

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from lightning_eos.curvature import flatten, lanczos, unflatten

TOL = 1e-3
# inputs, hidden, outputs, loss, lr, batch size, steps
SETTINGS = [
    (8, 16, 3, "mse", 0.1, 16, 30),
    (8, 16, 3, "ce", 0.1, 16, 30),
    (8, 16, 5, "mse", 0.1, 16, 30),
    (8, 16, 5, "ce", 0.5, 16, 30),
    (6, 12, 4, "mse", 0.6, 60, 60),
    (6, 12, 4, "ce", 3.0, 60, 60),
    (8, 16, 3, "mse", 0.8, 60, 60),
    (8, 16, 5, "ce", 2.0, 60, 60),
]


def _loss(kind, out, y):
    return F.mse_loss(out, y) if kind == "mse" else F.cross_entropy(out, y)


def _dense_hessian(net, kind, x, y):
    net = net.double()
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]

    def loss_of(flat):
        values = dict(zip(names, unflatten(flat, params), strict=True))
        return _loss(kind, torch.func.functional_call(net, values, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flatten(params).detach())


def trajectory(setting, seed):
    """Dense float64 Hessians every 5 steps of one training run."""
    inputs, hidden, outputs, kind, lr, batch, steps = setting
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, inputs, generator=g)
    if kind == "mse":
        y = torch.randn(60, outputs, generator=g)
    else:
        y = torch.randint(0, outputs, (60,), generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    hessians = []
    for step in range(steps + 1):
        if step % 5 == 0:
            yd = y.double() if kind == "mse" else y
            hessians.append(_dense_hessian(copy.deepcopy(net), kind, x.double(), yd))
        idx = torch.randperm(60, generator=g)[:batch]
        opt.zero_grad()
        _loss(kind, net(x[idx]), y[idx]).backward()
        opt.step()
    return hessians


def _clustered(h):
    top = torch.linalg.eigvalsh(h).flip(0)
    return 0.01 <= float((top[0] - top[1]) / top[0]) <= 0.10, float(top[0])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--starts", type=int, default=10, help="cold starts per Hessian")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [trajectory(s, seed) for s in SETTINGS for seed in range(args.seeds)]
    print(f"{sum(len(r) for r in runs)} Hessians in {len(runs)} runs, n = 121..195 parameters")
    columns = ("stop rule", "start", "tol", "measured", "lambda_2 reported", "products")
    print("  ".join(f"{c:>{w}}" for c, w in zip(columns, (9, 5, 6, 8, 17, 8))))
    # the monitors' default: "residual", with tol / 10 when there is no warm start
    plans = [("gap", "cold", TOL), ("gap", "warm", TOL), ("residual", "cold", TOL)]
    plans += [("residual", "cold", TOL / 10), ("residual", "warm", TOL)]
    for rule, start, tol in plans:
        failures = total = 0
        products = []
        for run in runs:
            warm = None
            for i, h in enumerate(run):
                clustered, top = _clustered(h)
                inits = [warm] if start == "warm" else [None] * args.starts
                for j, init in enumerate(inits):
                    generator = torch.Generator().manual_seed(7919 * i + j + 1)
                    res = lanczos(h.float(), init=init, tol=tol, stop_rule=rule,
                                  generator=generator)  # fmt: skip
                    if start == "warm":
                        warm = res.restart_vectors
                    if clustered:
                        total += 1
                        products.append(res.num_iterations)
                        failures += (top - float(res.eigenvalues[0])) > TOL * top
        rate = f"{failures:>7} ({failures / total:.2%})"
        print(
            f"{rule:>9}  {start:>5}  {tol:>6.0e}  {total:>8}  {rate:>17}  "
            f"mean {statistics.mean(products):.1f}, median {statistics.median(products)}"
        )


if __name__ == "__main__":
    main()
