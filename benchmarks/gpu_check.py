"""The monitors on a CUDA device: exactness, precision handling, non-perturbation, cost.

python benchmarks/gpu_check.py [--out DIR]     (falls back to the CPU without CUDA)

A. fp32: the logged lambda_i(P^-1 H) and lambda_i(H) of Adam against a float64 dense
   reference on the CPU, built from the final parameters and optimizer state.
B. bf16-mixed: the same; the monitor must measure in float32 with autocast off.
C. a BatchNorm network under SGD: train-mode lambda_i(H) against the dense reference.
D. non-perturbation: parameters and Adam state, bit for bit, with and without monitors
   (deterministic kernels).
E. cost: one cold and one warm measurement of the 95k-parameter digits FCN, full batch.
F. SAM under 16-mixed (SAMMixedPrecision, CUDA GradScaler) and bf16-mixed against eq. (1)
   written by hand under the same autocast; an inf on the perturbed pass skips the step.
G. IASMonitor (b = 32 of n = 200, exact tr(HS_1)) in fp32 and bf16-mixed: the logged IAS,
   rho_b and tr(S_b) against float64 per-sample gradients and a dense Hessian on the CPU.
H. cost of one IAS measurement (b = 64, 64 sampled per-sample gradients) of the 95k FCN on
   the 1500 digits, next to one cold lambda_1 measurement.

python benchmarks/gpu_check.py --only G H      runs a subset
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lightning_eos.callbacks import (  # noqa: E402
    IASMonitor,
    PreconditionedSharpnessMonitor,
    SharpnessMonitor,
)
from lightning_eos.curvature import (  # noqa: E402
    HessianOperator,
    interaction_aware_sharpness,
    lanczos,
)
from lightning_eos.data import DigitsDataModule  # noqa: E402
from lightning_eos.models import FCN  # noqa: E402
from lightning_eos.optim import read_preconditioner  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Net(L.LightningModule):
    def __init__(self, batchnorm: bool = False, optimizer: str = "adam"):
        super().__init__()
        norm = nn.BatchNorm1d(32) if batchnorm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(64, 32), norm, nn.Tanh(), nn.Linear(32, 10))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=1e-4)
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def _fit(
    callbacks=(),
    precision="32-true",
    batchnorm=False,
    optimizer="adam",
    steps=10,
    model=None,
    plugins=None,
):
    L.seed_everything(0, verbose=False)
    model = model() if model is not None else Net(batchnorm, optimizer)
    trainer = L.Trainer(
        accelerator=DEVICE,
        devices=1,
        precision=None if plugins else precision,
        plugins=plugins,
        max_steps=steps,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    data = DigitsDataModule(num_train=256, num_val=32, batch_size=256, target="label")
    trainer.fit(model, data)
    return model, trainer


def _reference(model, trainer, k=2):
    """float64 CPU: top-k of P^-1/2 (H + L2) P^-1/2 (if an adaptive optimizer) and of H."""
    net = model.net.to("cpu", torch.float64).train()
    torch.func.replace_all_batch_norm_modules_(net)  # batch statistics, no buffer updates
    x, y = trainer.datamodule.train_set.tensors
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach() for p in net.parameters()]
    sizes = [p.numel() for p in params]
    buffers = {n: b.clone() for n, b in net.named_buffers()}

    def loss(flat):
        values = dict(zip(names, (v.view_as(p) for v, p in zip(flat.split(sizes), params))))
        out = torch.func.functional_call(net, ({**values, **buffers},), (x.double(),))
        return F.cross_entropy(out, y)

    hessian = torch.func.hessian(loss)(torch.cat([p.reshape(-1) for p in params]))
    raw = torch.linalg.eigvalsh(hessian).flip(0)[:k].tolist()
    try:
        reading = read_preconditioner(trainer.optimizers[0])
    except TypeError:
        return None, raw
    diagonal = torch.cat([d.reshape(-1).cpu() for d in reading.diagonal]).double()
    l2 = torch.cat([torch.full((n,), w) for n, w in zip(sizes, reading.l2)]).double()
    scale = diagonal.rsqrt()
    pre = scale[:, None] * (hessian + torch.diag(l2)) * scale[None, :]
    return torch.linalg.eigvalsh(pre).flip(0)[:k].tolist(), raw


def _rel(measured, exact):
    return max(abs(m - e) / abs(e) for m, e in zip(measured, exact))


def check_exact(precision):
    monitor = PreconditionedSharpnessMonitor(every_n_steps=5, top_k=2, num_samples=None, tol=1e-6)
    model, trainer = _fit([monitor], precision=precision)
    last = monitor.history[-1]
    pre, raw = _reference(model, trainer)
    measured_pre = [last["eos/preconditioned_sharpness"], last["eos/preconditioned_eig_2"]]
    measured_raw = [last["eos/sharpness"], last["eos/eig_2"]]
    return {
        "precision": precision,
        "preconditioned": measured_pre,
        "preconditioned_ref": pre,
        "preconditioned_rel_err": _rel(measured_pre, pre),
        "raw_rel_err": _rel(measured_raw, raw),
        "steps": [h["step"] for h in monitor.history],
    }


def check_batchnorm():
    monitor = SharpnessMonitor(every_n_steps=5, top_k=2, num_samples=None, tol=1e-6)
    model, trainer = _fit([monitor], batchnorm=True, optimizer="sgd")
    last = monitor.history[-1]
    _, raw = _reference(model, trainer)
    return {"raw_rel_err": _rel([last["eos/sharpness"], last["eos/eig_2"]], raw)}


def check_non_perturbation():
    def run(with_monitors):
        callbacks = (
            [
                PreconditionedSharpnessMonitor(every_n_steps=3, top_k=2, num_samples=128),
                SharpnessMonitor(every_n_steps=4, num_samples=64, chunk_size=32, threshold=None),
            ]
            if with_monitors
            else []
        )
        model, trainer = _fit(callbacks, steps=12)
        return model, trainer.optimizers[0]

    a_model, a_opt = run(True)
    b_model, b_opt = run(False)
    params = all(torch.equal(a, b) for a, b in zip(a_model.parameters(), b_model.parameters()))
    state = all(
        torch.equal(sa[key], sb[key])
        for sa, sb in zip(a_opt.state.values(), b_opt.state.values())
        for key in sa
    )
    return {"params_bit_identical": params, "adam_state_bit_identical": state}


def check_cost():
    torch.manual_seed(0)
    data = DigitsDataModule(target="onehot")
    data.setup()
    x, y = (t.to(DEVICE) for t in data.train_set.tensors)
    model = FCN(width=200, depth=3, activation="tanh").to(DEVICE)
    op = HessianOperator(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), [(x, y)])
    timings = {}
    warm = None
    for name in ("cold", "warm", "warm_again"):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = lanczos(op, 1, init=warm, tol=1e-3)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        timings[name] = {
            "ms": 1000 * (time.perf_counter() - start),
            "hvps": result.num_iterations,
            "lambda_1": result.eigenvalues[0].item(),
        }
        warm = result.restart_vectors
    return timings


class SAMNet(Net):
    def __init__(self, inf_at=None):
        super().__init__()
        self.inf_at = inf_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        sam = self.trainer.optimizers[0]
        if self.trainer.global_step == self.inf_at and sam.perturbed:
            return loss * float("inf")
        return loss

    def configure_optimizers(self):
        from lightning_eos.optim import SAM

        return SAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.5)


def _sam_fit(precision, steps, inf_at=None):
    from lightning_eos.callbacks import SAMMixedPrecision

    plugin = SAMMixedPrecision("16-mixed", DEVICE) if precision == "16-mixed" else None
    model, trainer = _fit(
        precision=precision,
        steps=steps,
        model=lambda: SAMNet(inf_at),
        plugins=[plugin] if plugin else None,
    )
    return model, trainer, plugin


def _sam_reference(precision, steps):
    L.seed_everything(0, verbose=False)
    net = Net().net.to(DEVICE)
    data = DigitsDataModule(num_train=256, num_val=32, batch_size=256, target="label")
    data.setup()
    x, y = (t.to(DEVICE) for t in data.train_set.tensors)
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    scale = 2.0**16 if precision == "16-mixed" else 1.0
    params = list(net.parameters())

    def grads():
        net.zero_grad()
        with torch.autocast(DEVICE, dtype=dtype):
            loss = F.cross_entropy(net(x), y)
        (loss * scale).backward()
        return [p.grad / scale for p in params]

    for _ in range(steps):
        g = grads()
        norm = torch.sqrt(sum((gi.float() ** 2).sum() for gi in g))
        origin = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(0.1 * gi / norm)
        g2 = grads()
        with torch.no_grad():
            for p, o, gi in zip(params, origin, g2):
                p.copy_(o).sub_(0.5 * gi)
    return params


def check_sam():
    report = {}
    for precision in ("16-mixed", "bf16-mixed"):
        model, _, _ = _sam_fit(precision, 5)
        ref = _sam_reference(precision, 5)
        pairs = zip(model.net.parameters(), ref)  # Lightning moves the model back to the CPU
        diff = max((a.cpu() - b.cpu()).abs().max().item() for a, b in pairs)
        report[f"{precision}_max_abs_diff_vs_eq1"] = diff
    clean, _, _ = _sam_fit("16-mixed", 2)
    hit, _, plugin = _sam_fit("16-mixed", 3, inf_at=2)
    report["inf_step_skipped_weights_equal"] = all(
        torch.equal(a.cpu(), b.cpu()) for a, b in zip(clean.parameters(), hit.parameters())
    )
    report["scale_after_inf"] = plugin.scaler.get_scale()
    return report


def _ias_reference(model, x, y, b):
    """IAS, rho_b, tr(S_b) from float64 per-sample gradients and the dense Hessian (CPU)."""
    net = model.net.cpu().double()
    x = x.double()
    params = list(net.parameters())
    names = [k for k, _ in net.named_parameters()]
    rows = [
        torch.cat(
            [
                g.reshape(-1)
                for g in torch.autograd.grad(
                    F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), params
                )
            ]
        )
        for i in range(len(x))
    ]
    G = torch.stack(rows)

    def loss_of(flat):
        values = {
            k: c.view_as(p)
            for k, c, p in zip(names, flat.split([p.numel() for p in params]), params)
        }
        return F.cross_entropy(torch.func.functional_call(net, values, (x,)), y)

    H = torch.autograd.functional.hessian(
        loss_of, torch.cat([p.detach().reshape(-1) for p in params])
    )
    g, n = G.mean(0), len(x)
    w = (n - b) / (n - 1) / b
    trace_S_b = w * float((G * G).sum(1).mean()) + (1 - w) * float(g @ g)
    trace_HS_b = w * float(torch.einsum("ij,jk,ik->i", G, H, G).mean()) + (1 - w) * float(g @ H @ g)
    return {
        "eos/ias": trace_HS_b / trace_S_b,
        "eos/rho_b": float(g @ g) / trace_S_b,
        "eos/trace_S_b": trace_S_b,
    }


def check_ias():
    report = {}
    for precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0, verbose=False)
        model = Net(optimizer="sgd")
        monitor = IASMonitor(every_n_steps=5, samples=None, tol=1e-8)
        data = DigitsDataModule(
            num_train=200, num_val=50, batch_size=32, target="label", shuffle=True
        )
        trainer = L.Trainer(
            accelerator="gpu" if DEVICE == "cuda" else "cpu",
            devices=1,
            precision=precision,
            max_steps=10,
            logger=False,
            callbacks=[monitor],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, data)
        x, y = data.train_set.tensors
        ref = _ias_reference(model, x, y, b=32)
        last = monitor.history[-1]
        report[precision] = {k: _rel([last[k]], [v]) for k, v in ref.items()}
    return report


def check_ias_cost():
    data = DigitsDataModule(target="onehot")
    data.setup()
    x, y = (t.to(DEVICE) for t in data.train_set.tensors)
    torch.manual_seed(0)
    model = FCN(width=200, depth=3, activation="tanh").to(DEVICE)

    def mse(m, batch):
        return F.mse_loss(m(batch[0]), batch[1])

    def sync():
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    report = {}
    for attempt in ("cold", "repeat"):
        op = HessianOperator(model, mse, [(x, y)])
        sync()
        start = time.perf_counter()
        result = interaction_aware_sharpness(
            op, 64, samples=64, generator=torch.Generator().manual_seed(0)
        )
        sync()
        ias_ms = 1e3 * (time.perf_counter() - start)
        op = HessianOperator(model, mse, [(x, y)])
        sync()
        start = time.perf_counter()
        lanczos(op, 1, tol=1e-3)
        sync()
        report[attempt] = {
            "ias_ms": ias_ms,
            "lanczos_cold_ms": 1e3 * (time.perf_counter() - start),
            "ias": result.ias,
            "ias_stderr": result.ias_stderr,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_check"))
    parser.add_argument("--only", nargs="*", default=None, help="check letters, e.g. G H")
    args = parser.parse_args()
    report = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "lightning": L.__version__,
    }
    for name, check in (
        ("A_fp32", lambda: check_exact("32-true")),
        ("B_bf16_mixed", lambda: check_exact("bf16-mixed")),
        ("C_batchnorm_sgd", check_batchnorm),
        ("D_non_perturbation", check_non_perturbation),
        ("E_cost_95k_fcn", check_cost),
        ("F_sam_mixed_precision", check_sam),
        ("G_ias_exact", check_ias),
        ("H_ias_cost_95k_fcn", check_ias_cost),
    ):
        if args.only and name[0] not in args.only:
            continue
        try:
            report[name] = check()
        except Exception as err:  # noqa: BLE001 - report every check, whatever fails
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        print(name, json.dumps(report[name]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
