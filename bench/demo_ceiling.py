"""How well the demo's validation rates can be recovered from their spikes at all: fit each
trial's initial state under the true chaotic network (its weights, gain and the per-trial
min-max normalisation are known here, as no method on real data knows them) by maximising
the Poisson likelihood plus the N(0, x0_std^2) prior, in float64 with L-BFGS (PyTorch).

Two starts per trial: the true initial state (which finds the mode next to the truth) and
random draws from the prior (what an optimiser without the answer finds: the trajectories
are chaotic, so the objective has many local optima). For every trial the script checks
which start reached the lower objective; when the mode next to the truth is the lowest one
found, its R^2 is what the spikes support given the dynamics.

    python bench/demo_ceiling.py [--seed 0] [--burn-in 0] [--restarts 2] [--lfads DIR ...]

--lfads DIR adds two rows per `lfads-fast demo --out DIR` run (same seed and burn-in): the
posterior-averaged rates of DIR/posterior.h5, and the same trained generator
(DIR/train/checkpoints/best.h5) started from initial conditions refined by MAP (its encoder's
posterior mean as the start, the model's prior, L-BFGS): how much of LFADS's error is its
encoder's (amortised inference) and how much its generator's. Writes
bench/results/demo_ceiling_cpu.md.
"""
import argparse
import platform
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from lfads_fast import metrics, synth

# Model settings named for each --lfads run.
RUN_FIELDS = ("ic_enc_dim", "ic_dim", "gen_dim", "fac_dim", "co_dim", "dropout_rate")


def _epochs(run):
    with open(Path(run) / "train" / "log.csv") as f:
        return sum(1 for _ in f) - 1


def rates_of(x0, weights, g, alpha, n_bins, scale):
    """Expected counts [B, T, N] of synth.chaotic_rnn's network from states x0 [B, N]."""
    recurrent = (alpha * g) * weights.T
    x, r, out = x0, torch.tanh(x0), []
    for _ in range(n_bins):
        x = (1 - alpha) * x + r @ recurrent
        r = torch.tanh(x)
        out.append(r)
    s = torch.stack(out, 1)
    low = s.min(1, keepdim=True).values
    high = s.max(1, keepdim=True).values
    return (s - low) / (high - low) * scale


def refined_rates(checkpoint, ic_mean, spikes, iters):
    """Rates [B, T, N] of a trained controller-free model's generator from the initial
    conditions that maximise its Poisson likelihood plus its learned Gaussian prior, found
    by L-BFGS from ic_mean [B, ic_dim]."""
    from lfads_fast.train import load_model

    model = load_model(checkpoint)
    cfg = model.config
    if cfg.co_dim or cfg.ext_input_dim or cfg.multisession:
        raise ValueError(f"{checkpoint}: refinement is written for one session without a "
                         "controller or external inputs")
    p = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in model.views(model.flat).items()}
    fac_W = p["fac_W"] / torch.linalg.vector_norm(p["fac_W"], dim=1, keepdim=True)
    H = cfg.gen_dim
    W_z, W_r, W_n = p["gen_W_hh"][:H], p["gen_W_hh"][H:2 * H], p["gen_W_hh"][2 * H:]
    b_z, b_r, b_n = p["gen_b_ih"][:H], p["gen_b_ih"][H:2 * H], p["gen_b_ih"][2 * H:]

    def rates(ic):  # the clipped GRU without inputs, factors, exponential read-out
        g = ic @ p["ic_to_g0_W"].T + p["ic_to_g0_b"]
        factors = []
        for _ in range(cfg.recon_seq_len):
            z = torch.sigmoid(b_z + g @ W_z.T)
            r = torch.sigmoid(b_r + g @ W_r.T)
            n = torch.tanh(b_n + (r * g) @ W_n.T)
            g = torch.clamp(z * g + (1 - z) * n, -cfg.cell_clip, cfg.cell_clip)
            factors.append(g @ fac_W.T)
        return torch.exp(torch.stack(factors, 1) @ p["readout_W"].T + p["readout_b"])

    ic = ic_mean.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([ic], lr=1, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lam = rates(ic)
        prior = 0.5 * ((ic - p["ic_prior_mean"]) ** 2).sum() / cfg.ic_prior_var
        loss = (lam - spikes * torch.log(lam)).sum() + prior
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return rates(ic).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--burn-in", type=int, default=0)
    ap.add_argument("--restarts", type=int, default=2, help="random starts per trial")
    ap.add_argument("--iters", type=int, default=300, help="L-BFGS iterations per fit")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads")
    ap.add_argument("--lfads", nargs="*", default=[], help="lfads-fast demo output directories")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                          "demo_ceiling_cpu.md"))
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(args.threads)

    sd = synth.chaotic_rnn(seed=args.seed, burn_in_bins=args.burn_in)
    p = sd.params
    alpha, scale = p["dt"] / p["tau"], p["max_firing_rate"] * p["dt"]
    weights = torch.tensor(sd.system["weights"])
    x0_true = torch.tensor(sd.system["x0"])[torch.tensor(sd.valid.conditions)]
    spikes = torch.tensor(sd.valid.spikes, dtype=torch.float64)
    truth = sd.valid.rates.astype(np.float64)
    n_bins = truth.shape[1]
    prior_var = p["x0_std"] ** 2
    forward = lambda x0: rates_of(x0, weights, p["g"], alpha, n_bins, scale)  # noqa: E731
    err = float(np.abs(forward(x0_true).numpy() - truth).max())
    assert err < 1e-6, f"the network here does not reproduce synth's rates (max error {err})"

    def objective(x0):  # per trial
        lam = forward(x0).clamp_min(1e-12)
        return (lam - spikes * torch.log(lam)).sum((1, 2)) + 0.5 * (x0 ** 2).sum(1) / prior_var

    def fit(start):
        x = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([x], lr=1, max_iter=args.iters, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            loss = objective(x).sum()
            loss.backward()
            return loss
        opt.step(closure)
        x = x.detach()
        with torch.no_grad():
            return x, objective(x)

    var = ((truth - truth.mean()) ** 2).mean()

    def r2(pred):
        return 1 - ((pred - truth) ** 2).mean() / var

    def tenths(pred):
        return metrics.error_by_time(pred, truth, 10).tolist()

    rows, runs = [], []
    t0 = time.perf_counter()
    x_near, f_near = fit(x0_true)
    rate_near = forward(x_near).numpy()
    t_near = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(args.seed + 1)
    x_rand = f_rand = None
    for _ in range(args.restarts):
        x, f = fit(np.sqrt(prior_var) * torch.randn(x0_true.shape, generator=gen))
        if x_rand is None:
            x_rand, f_rand = x, f
        else:
            better = f < f_rand
            x_rand[better], f_rand = x[better], torch.minimum(f, f_rand)
    near_lowest = float((f_near <= f_rand + 1e-6).double().mean())
    rows.append(("MAP under the true network, started at the true x0", r2(rate_near),
                 tenths(rate_near)))
    rate_rand = forward(x_rand).numpy()
    rows.append((f"MAP under the true network, best of {args.restarts} random starts",
                 r2(rate_rand), tenths(rate_rand)))
    for run in args.lfads:
        path = Path(run) / "posterior.h5"
        with h5py.File(path, "r") as f:
            pred = f["valid_output_params"][()].astype(np.float64)
            ic_mean = torch.tensor(f["valid_ic_mean"][()], dtype=torch.float64)
        if pred.shape != truth.shape:
            raise ValueError(f"{path}: valid_output_params has shape {pred.shape}, expected "
                             f"{truth.shape} (same --seed and --burn-in as the demo?)")
        name = Path(run).name
        with open(Path(run) / "train" / "config.yaml") as f:
            settings = yaml.safe_load(f)
        runs.append(f"- `{name}`: model " + ", ".join(
            f"{k} {v}" for k, v in settings["model"].items() if k in RUN_FIELDS) +
            f"; {_epochs(run)} epochs")
        rows.append((f"LFADS posterior mean (`{name}`)", r2(pred), tenths(pred)))
        rate = refined_rates(Path(run) / "train" / "checkpoints" / "best.h5", ic_mean, spikes,
                             args.iters)
        rows.append((f"LFADS generator (`{name}`), MAP initial conditions", r2(rate),
                     tenths(rate)))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    lines = [
        "# What the demo's spikes support: MAP initial states under the true network",
        "",
        f"Data: synth.chaotic_rnn(seed={args.seed}, burn_in_bins={args.burn_in}), "
        f"{truth.shape[0]} validation trials x {n_bins} bins x {truth.shape[2]} neurons. "
        f"Commit {commit}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; MAP fit next to the truth {t_near:.0f} s.",
        "",
        f"Trials where the mode next to the true x0 has the lowest objective found: "
        f"{100 * near_lowest:.1f}%.",
        "",
        "Squared error per tenth of the trial, as a fraction of the rates' variance:",
        "",
        "| estimate | valid R^2 | " + " | ".join(f"bins {i * n_bins // 10}-{(i + 1) * n_bins // 10 - 1}"
                                      for i in range(10))
        + " |",
        "|---|---|" + "---|" * 10,
    ]
    for name, value, prof in rows:
        lines.append(f"| {name} | {value:.4f} | " + " | ".join(f"{e:.3f}" for e in prof) + " |")
    if runs:
        lines += ["", "LFADS runs (`lfads-fast demo --out NAME`):", ""] + runs
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
