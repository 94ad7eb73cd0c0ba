"""Top Hessian eigenvalue: our Lanczos against PyHessian and hessian-eigenthings.

Everything runs in one process on the same models: an FCN trained with full-batch GD on
scikit-learn digits, measured on the whole 1500-sample training split as one chunk, for
MSE (one-hot targets) and cross-entropy (labels), once during progressive sharpening and
once at the edge of stability. Every method builds its operator inside the timed region
(PyHessian does its forward/backward in its constructor). The reference is our Lanczos
on a float64 copy of the model at ``tol=1e-12``, checked once against
``scipy.sparse.linalg.eigsh``.

Run: ``.venv/bin/python benchmarks/sharpness.py`` (about half a minute on 2 idle CPU cores).
"""

import os

# One thread count for torch's OpenMP and MKL pools (torch's default: the core count).
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import argparse
import copy
import importlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hessian_eigenthings import HessianOperator as HEOperator
from hessian_eigenthings import lanczos as he_lanczos
from pyhessian import hessian as PyHessian
from scipy.sparse.linalg import LinearOperator, eigsh
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from lightning_eos.curvature import HessianOperator, LanczosResult, lanczos
from lightning_eos.data import DigitsDataModule
from lightning_eos.models import FCN, mse_loss

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]

PYHESSIAN_MAX_ITER = 100  # pyhessian's default maxIter
HE_MAX_ITER = 20  # hessian-eigenthings runs exactly this many steps (its k=1 default: 2)
COLD_TOL, WARM_TOL = 1e-4, 1e-3
WARM_GAP = 10  # GD steps between the warm start's source measurement and the warm one
HVP_REPEATS = 5
BARS = (
    "warm: rel.err <= 1e-3 with <= 4 HVPs, in <= 0.5x PyHessian's time; "
    "cold: rel.err <= 1e-4 in <= 2x PyHessian's time; "
    "a whole measurement costs at most 1.2x its HVPs"
)


@dataclass
class Setting:
    """One loss and its training run."""

    name: str
    target: str
    loss_fn: LossFn
    criterion: Callable[[Tensor, Tensor], Tensor]
    lr: float
    steps: dict[str, int]  # phase label -> GD step


@dataclass
class Estimate:
    """One method's top eigenvalue and what it cost."""

    eigenvalue: float
    hvps: int
    stop: str


@dataclass
class Timed:
    """A method's estimate with the median wall time of its repeats."""

    label: str
    estimate: Estimate
    seconds: float


@dataclass
class Method:
    """``prepare`` runs untimed before each repeat; ``run`` is timed on its result."""

    label: str
    prepare: Callable[[], Any]
    run: Callable[[Any], Estimate]


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_interleaved(methods: list[Method], repeats: int) -> list[Timed]:
    """Time every method ``repeats`` times, round-robin so that load bursts hit all alike."""
    times: dict[str, list[float]] = {m.label: [] for m in methods}
    estimates: dict[str, Estimate] = {}
    for _ in range(repeats):
        for method in methods:
            state = method.prepare()
            start = time.perf_counter()
            estimates[method.label] = method.run(state)
            times[method.label].append(time.perf_counter() - start)
    return [Timed(m.label, estimates[m.label], statistics.median(times[m.label])) for m in methods]


def lanczos_estimate(res: LanczosResult) -> Estimate:
    """Our Lanczos result as an :class:`Estimate`."""
    stop = "converged" if res.converged else "max_iter"
    value = float(res.eigenvalues[0])
    err = float(res.error_estimates[0]) / abs(value)
    return Estimate(value, res.num_iterations, f"{stop}, est. rel.err {err:.1e}")


@contextmanager
def counting_pyhessian_hvps() -> Iterator[list[int]]:
    """Count calls of ``pyhessian.hessian.hessian_vector_product`` (one per power step)."""
    module = importlib.import_module("pyhessian.hessian")
    original = module.hessian_vector_product
    calls = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    module.hessian_vector_product = counted
    try:
        yield calls
    finally:
        module.hessian_vector_product = original


def pyhessian_method(model: nn.Module, setting: Setting, batch: Batch) -> Method:
    """PyHessian's defaults (power iteration, maxIter=100, tol=1e-3) on a copy of ``model``.

    The copy keeps PyHessian's side effects (``eval()``, a ``.grad`` with a graph) off the
    trained model; its random start comes from the global RNG, seeded for repeatability.
    """

    def prepare() -> nn.Module:
        torch.manual_seed(0)
        return copy.deepcopy(model)

    def run(net: nn.Module) -> Estimate:
        with counting_pyhessian_hvps() as calls, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_graph=True.*")
            eigenvalues, _ = PyHessian(net, setting.criterion, data=batch, cuda=False).eigenvalues()
        for p in net.parameters():
            p.grad = None  # break the parameter <-> graph cycle left by backward(create_graph)
        stop = "max_iter" if calls[0] >= PYHESSIAN_MAX_ITER else "rel. change < 1e-3"
        return Estimate(float(eigenvalues[0]), calls[0], stop)

    return Method("PyHessian (power iteration, defaults)", prepare, run)


def eigenthings_method(model: nn.Module, setting: Setting, batch: Batch) -> Method:
    """hessian-eigenthings' Lanczos, which takes exactly ``HE_MAX_ITER`` steps."""

    def run(_: None) -> Estimate:
        op = HEOperator(model, [batch], setting.loss_fn)
        matvec, calls = op.matvec, [0]

        def counted(v: Tensor) -> Tensor:
            calls[0] += 1
            return matvec(v)

        op.matvec = counted
        res = he_lanczos(op, k=1, max_iter=HE_MAX_ITER, which="LA", seed=0)
        stop = "rel. residual < 1e-4" if bool(res.converged[0]) else "rel. residual >= 1e-4"
        return Estimate(float(res.eigenvalues[0]), calls[0], f"fixed steps, {stop}")

    label = f"hessian-eigenthings Lanczos (max_iter={HE_MAX_ITER}, LA)"
    return Method(label, lambda: None, run)


def ours_method(
    model: nn.Module, setting: Setting, batch: Batch, label: str, **kwargs: Any
) -> Method:
    """Our Lanczos on a fresh operator; ``kwargs`` go to :func:`lanczos`."""

    def run(_: None) -> Estimate:
        op = HessianOperator(model, setting.loss_fn, [batch])
        return lanczos_estimate(lanczos(op, k=1, **kwargs))

    return Method(label, lambda: None, run)


def float64_copy(model: nn.Module, batch: Batch) -> tuple[nn.Module, Batch]:
    """The model and batch in float64 (integer labels stay integers)."""
    x, y = batch
    return copy.deepcopy(model).double(), (x.double(), y.double() if y.is_floating_point() else y)


def reference(model: nn.Module, setting: Setting, batch: Batch) -> Timed:
    """Our Lanczos in float64 at ``tol=1e-12``, timed once."""
    model64, batch64 = float64_copy(model, batch)
    start = time.perf_counter()
    op = HessianOperator(model64, setting.loss_fn, [batch64])
    est = lanczos_estimate(lanczos(op, k=1, tol=1e-12, max_iter=300))
    return Timed("reference: ours, float64, tol=1e-12", est, time.perf_counter() - start)


def eigsh_top(model: nn.Module, setting: Setting, batch: Batch) -> Estimate:
    """ARPACK's largest algebraic eigenvalue of the float64 Hessian (single-threaded BLAS)."""
    model64, batch64 = float64_copy(model, batch)
    op = HessianOperator(model64, setting.loss_fn, [batch64])

    def matvec(v: np.ndarray) -> np.ndarray:
        return op.matvec(torch.from_numpy(np.ascontiguousarray(v).ravel())).numpy()

    linear = LinearOperator((op.dim, op.dim), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(op.dim)
    with threadpool_limits(limits=1, user_api="blas"):
        (value,) = eigsh(linear, k=1, which="LA", tol=1e-12, v0=v0, return_eigenvectors=False)
    return Estimate(float(value), op.num_matvecs, "ARPACK")


def gd_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, setting: Setting, batch: Batch, count: int
) -> None:
    """``count`` full-batch GD steps."""
    for _ in range(count):
        optimizer.zero_grad()
        setting.loss_fn(model, batch).backward()
        optimizer.step()


def unit_costs(model: nn.Module, setting: Setting, batch: Batch) -> tuple[float, float]:
    """Median seconds of one gradient and of one standalone HVP (fresh operator + matvec)."""
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    grad = median_seconds(
        lambda: torch.autograd.grad(setting.loss_fn(model, batch), params), HVP_REPEATS
    )
    hvp = median_seconds(
        lambda: HessianOperator(model, setting.loss_fn, [batch]).matvec(v), HVP_REPEATS
    )
    return grad, hvp


def verdict(ok: bool, detail: str) -> str:
    """``PASS (detail)`` or ``FAIL (detail)``."""
    return f"{'PASS' if ok else 'FAIL'} ({detail})"


def measure_point(
    model: nn.Module,
    setting: Setting,
    batch: Batch,
    warm_init: Tensor,
    phase: str,
    step: int,
    repeats: int,
    cross_check: bool,
) -> dict[str, str]:
    """Print one point's table; return the verdict of each bar there."""
    params = sum(p.numel() for p in model.parameters())
    ref = reference(model, setting, batch)
    lam_ref = ref.estimate.eigenvalue
    grad_s, hvp_s = unit_costs(model, setting, batch)
    methods = [
        pyhessian_method(model, setting, batch),
        eigenthings_method(model, setting, batch),
        ours_method(model, setting, batch, f"ours cold (tol={COLD_TOL:g})", tol=COLD_TOL),
        ours_method(
            model,
            setting,
            batch,
            f"ours warm (init from step {step - WARM_GAP}, tol={WARM_TOL:g})",
            init=warm_init,
            tol=WARM_TOL,
        ),
    ]
    timed = run_interleaved(methods, repeats)
    pyh_s = timed[0].seconds

    print(
        f"\n## FCN 64-200-200-200-10 tanh ({params:,} params), {setting.name}, "
        f"lr={setting.lr:g}, step {step} ({phase}): lambda_ref={lam_ref:.6f}, "
        f"2/lr={2 / setting.lr:.4f}, lambda_ref*lr/2={lam_ref * setting.lr / 2:.3f}"
    )
    print(
        f"one gradient: {grad_s * 1e3:.1f} ms; one standalone HVP: {hvp_s * 1e3:.1f} ms; "
        f"HVP/gradient: {hvp_s / grad_s:.2f}x\n"
    )
    print(
        "| method | lambda_1 | rel.err | HVPs | time (ms) | time / PyHessian "
        "| cost / (HVPs x HVP) | stop |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    rows: dict[str, tuple[float, float, float]] = {}
    for row in [ref, *timed]:
        est = row.estimate
        err = abs(est.eigenvalue - lam_ref) / abs(lam_ref)
        cost = row.seconds / (est.hvps * hvp_s)
        rows[row.label] = (err, row.seconds / pyh_s, cost)
        # the reference runs in float64, so neither ratio to float32 timings means much
        vs_pyh = "-" if row is ref else f"{row.seconds / pyh_s:.2f}x"
        per_hvp = "-" if row is ref else f"{cost:.2f}"
        print(
            f"| {row.label} | {est.eigenvalue:.6f} | {err:.1e} | {est.hvps} | "
            f"{row.seconds * 1e3:.0f} | {vs_pyh} | {per_hvp} | {est.stop} |"
        )
    if cross_check:
        check = eigsh_top(model, setting, batch)
        diff = abs(check.eigenvalue - lam_ref) / abs(lam_ref)
        print(
            f"\nreference cross-check: scipy eigsh(which='LA') on the float64 HVP = "
            f"{check.eigenvalue:.10f} ({check.hvps} HVPs), |eigsh - ref|/ref = {diff:.1e}"
        )

    cold_err, cold_vs, cold_cost = rows[timed[2].label]
    warm_err, warm_vs, warm_cost = rows[timed[3].label]
    warm_hvps = timed[3].estimate.hvps
    verdicts = {
        "warm: err <= 1e-3, <= 4 HVPs, <= 0.5x PyHessian": verdict(
            warm_err <= 1e-3 and warm_hvps <= 4 and warm_vs <= 0.5,
            f"{warm_err:.1e}, {warm_hvps} HVPs, {warm_vs:.2f}x",
        ),
        "cold: err <= 1e-4, <= 2x PyHessian": verdict(
            cold_err <= 1e-4 and cold_vs <= 2.0, f"{cold_err:.1e}, {cold_vs:.2f}x"
        ),
        "cold: cost <= 1.2x HVPs": verdict(cold_cost <= 1.2, f"{cold_cost:.2f}x"),
        "warm: cost <= 1.2x HVPs": verdict(warm_cost <= 1.2, f"{warm_cost:.2f}x"),
    }
    print(f"\nbars at {setting.name} step {step}:")
    for bar, result in verdicts.items():
        print(f"- {bar}: {result}")
    return verdicts


def run_setting(
    setting: Setting, repeats: int, cross_check_phase: str | None
) -> dict[str, dict[str, str]]:
    """Train ``setting``'s model, measure at each of its points; bar verdicts by point."""
    dm = DigitsDataModule(target=setting.target)
    dm.setup()
    batch: Batch = tuple(dm.train_set.tensors)
    torch.manual_seed(0)
    model = FCN()
    optimizer = torch.optim.SGD(model.parameters(), lr=setting.lr)
    done, verdicts = 0, {}
    for phase, step in sorted(setting.steps.items(), key=lambda item: item[1]):
        if step - WARM_GAP < done:
            raise ValueError(f"{setting.name}: points must be at least {WARM_GAP} steps apart.")
        gd_steps(model, optimizer, setting, batch, step - WARM_GAP - done)
        source = lanczos(HessianOperator(model, setting.loss_fn, [batch]), k=1, tol=WARM_TOL)
        gd_steps(model, optimizer, setting, batch, WARM_GAP)
        done = step
        key = f"{setting.name} step {step} ({phase})"
        verdicts[key] = measure_point(
            model,
            setting,
            batch,
            source.restart_vectors,
            phase,
            step,
            repeats,
            cross_check=phase == cross_check_phase,
        )
    return verdicts


def main() -> None:
    """Parse arguments, run both losses and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-sharpening", type=int, default=50, help="MSE sharpening step")
    parser.add_argument("--steps-edge", type=int, default=300, help="MSE edge-of-stability step")
    parser.add_argument("--lr", type=float, default=2.0, help="MSE learning rate")
    parser.add_argument("--ce-steps-sharpening", type=int, default=120)
    parser.add_argument("--ce-steps-edge", type=int, default=150)
    parser.add_argument("--ce-lr", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method")
    args = parser.parse_args()

    settings = [
        Setting(
            "MSE",
            "onehot",
            lambda m, b: mse_loss(m(b[0]), b[1]),
            F.mse_loss,
            args.lr,
            {"progressive sharpening": args.steps_sharpening, "edge of stability": args.steps_edge},
        ),
        Setting(
            "CE",
            "label",
            lambda m, b: F.cross_entropy(m(b[0]), b[1]),
            F.cross_entropy,
            args.ce_lr,
            {
                "progressive sharpening": args.ce_steps_sharpening,
                "edge of stability": args.ce_steps_edge,
            },
        ),
    ]
    params = sum(p.numel() for p in FCN().parameters())
    print("# Top Hessian eigenvalue: ours vs PyHessian vs hessian-eigenthings\n")
    print(
        f"FCN 64-200-200-200-10 tanh ({params:,} params) on scikit-learn digits, full-batch GD "
        "(torch.optim.SGD, seed 0); measurement set: the 1500 training samples as one chunk. "
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, "
        f"load average at start {os.getloadavg()[0]:.2f}. Times: median of {args.repeats} "
        f"interleaved repeats, operator built inside the timed region; HVP: median of "
        f"{HVP_REPEATS}."
    )
    print(f"Bars: {BARS}.")
    verdicts: dict[str, dict[str, str]] = {}
    for setting in settings:
        cross_check = "edge of stability" if setting.name == "MSE" else None
        verdicts.update(run_setting(setting, args.repeats, cross_check))

    print(f"\n## Bars ({BARS}); load average at end {os.getloadavg()[0]:.2f}\n")
    points = list(verdicts)
    print("| bar | " + " | ".join(points) + " |")
    print("|---|" + "---|" * len(points))
    for bar in verdicts[points[0]]:
        print(f"| {bar} | " + " | ".join(verdicts[p][bar] for p in points) + " |")


if __name__ == "__main__":
    main()
