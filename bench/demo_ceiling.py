"""How well the demo's validation rates can be recovered from their spikes at all, given the
true chaotic network (its weights, gain and the per-trial min-max normalisation are known here,
as no method on real data knows them), with the N(0, x0_std^2) prior on each trial's initial
state; float64, PyTorch.

The Bayes-optimal estimate. The rates' posterior mean, E[rates | the trial's spikes], has the
least expected squared error of any estimate from one trial's spikes. It is computed by
Hamiltonian Monte Carlo on each trial's initial state, started at the true x0: the true state
is itself an exact draw from the posterior (the data were drawn from this model), so the chain
is stationary from its first step and needs no burn-in to reach the posterior, only the first
--hmc-adapt iterations to tune each trial's step size. Reported: the average of the rates over
the draws that follow, one draw alone (a draw's expected squared error is twice the posterior
mean's; the trace shows the chain moving away from the truth), and the trace.

Maximum a posteriori fits (L-BFGS). Two starts per trial: the true initial state and random
draws from the prior. The chaotic trajectories make the objective rugged, with local optima
everywhere: the fit started at the truth stops at a local optimum near it (how near depends
on how far the optimiser goes: L-BFGS runs on all trials' objectives summed, so fewer
trials go further), so its R^2 measures the ruggedness, not what the spikes determine; from
random starts the fits end far off.

    python bench/demo_ceiling.py [--seed 0] [--burn-in 0] [--restarts 2] [--hmc-iters 600]
        [--lfads DIR ...]

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
RUN_FIELDS = ("ic_enc_dim", "ic_dim", "gen_dim", "fac_dim", "co_dim", "dropout_rate",
              "kl_ic_scale")


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


def hmc_posterior_mean(objective, x_start, n_iter, n_adapt, leapfrog, seed, report):
    """Hamiltonian Monte Carlo on each row of x_start [B, D] (one chain per trial, all in one
    batch) for the density exp(-objective(x)), objective giving [B].

    The first n_adapt iterations tune each chain's step size (x1.05 after an accepted
    proposal, x0.9 after a rejected one: about 2/3 accepted); the draws of the remaining
    iterations are returned through report(iteration, x, accepted) and averaged by the caller.
    Each step size is jittered by up to 20% per iteration so that no chain cycles.

    Returns:
        The acceptance rate of the iterations after the adaptation, per chain [B].
    """
    gen = torch.Generator().manual_seed(seed)

    def value_and_grad(x):
        x = x.detach().requires_grad_(True)
        f = objective(x)
        grad, = torch.autograd.grad(f.sum(), x)
        return f.detach(), grad

    x = x_start.clone()
    f, grad = value_and_grad(x)
    eps = torch.full((x.shape[0], 1), 0.01)
    accepted_sum = torch.zeros(x.shape[0])
    for it in range(n_iter):
        step = eps * (0.8 + 0.4 * torch.rand(eps.shape, generator=gen))
        p0 = torch.randn(x.shape, generator=gen)
        xn, p = x, p0 - 0.5 * step * grad
        for k in range(leapfrog):
            xn = xn + step * p
            fn, gn = value_and_grad(xn)
            p = p - (step if k < leapfrog - 1 else 0.5 * step) * gn
        log_ratio = (f + 0.5 * (p0 ** 2).sum(1)) - (fn + 0.5 * (p ** 2).sum(1))
        accept = torch.isfinite(log_ratio) & (
            torch.log(torch.rand(log_ratio.shape, generator=gen)) < log_ratio)
        x = torch.where(accept[:, None], xn, x)
        f = torch.where(accept, fn, f)
        grad = torch.where(accept[:, None], gn, grad)
        if it < n_adapt:
            eps = eps * torch.where(accept, 1.05, 0.9)[:, None]
        else:
            accepted_sum += accept.double()
            report(it, x, accept)
    return accepted_sum / max(n_iter - n_adapt, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--burn-in", type=int, default=0)
    ap.add_argument("--trials", type=int, default=None,
                    help="only the first TRIALS validation trials (default: all)")
    ap.add_argument("--restarts", type=int, default=2, help="random starts per trial")
    ap.add_argument("--iters", type=int, default=300, help="L-BFGS iterations per fit")
    ap.add_argument("--hmc-iters", type=int, default=600,
                    help="HMC iterations per chain (0: no posterior mean)")
    ap.add_argument("--hmc-adapt", type=int, default=100,
                    help="of them, the first ones that tune the step sizes")
    ap.add_argument("--hmc-leapfrog", type=int, default=10, help="leapfrog steps per iteration")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads")
    ap.add_argument("--lfads", nargs="*", default=[], help="lfads-fast demo output directories")
    ap.add_argument("--rates", nargs="*", default=[], metavar="LABEL=FILE[,FILE...]",
                    help="a row of valid_output_params from posterior files (averaged over the "
                    "files, e.g. the ensemble.h5 of several demo runs)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                          "demo_ceiling_cpu.md"))
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(args.threads)

    sd = synth.chaotic_rnn(seed=args.seed, burn_in_bins=args.burn_in)
    p = sd.params
    alpha, scale = p["dt"] / p["tau"], p["max_firing_rate"] * p["dt"]
    weights = torch.tensor(sd.system["weights"])
    if args.restarts < 1:
        raise ValueError(f"--restarts must be at least 1, got {args.restarts}")
    n_valid = sd.valid.rates.shape[0]
    if args.trials is not None and not 0 < args.trials <= n_valid:
        raise ValueError(f"--trials must be in 1..{n_valid}, got {args.trials}")
    keep = slice(0, args.trials or n_valid)
    x0_true = torch.tensor(sd.system["x0"])[torch.tensor(sd.valid.conditions[keep])]
    spikes = torch.tensor(sd.valid.spikes[keep], dtype=torch.float64)
    truth = sd.valid.rates[keep].astype(np.float64)
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
    trace = []
    if args.hmc_iters > args.hmc_adapt:
        draws = {"sum": np.zeros_like(truth), "n": 0, "last": None}
        t0 = time.perf_counter()

        def report(it, x, accept):
            with torch.no_grad():
                rate = forward(x).numpy()
            draws["sum"] += rate
            draws["n"] += 1
            draws["last"] = rate
            if draws["n"] == 1 or (it + 1) % 50 == 0 or it + 1 == args.hmc_iters:
                trace.append((it + 1, r2(rate), r2(draws["sum"] / draws["n"]),
                              time.perf_counter() - t0))
                print(f"HMC iteration {it + 1}: one draw R^2 {trace[-1][1]:.4f}, mean of "
                      f"{draws['n']} draws {trace[-1][2]:.4f} ({trace[-1][3]:.0f} s)", flush=True)
        acceptance = hmc_posterior_mean(objective, x0_true, args.hmc_iters, args.hmc_adapt,
                                        args.hmc_leapfrog, args.seed + 2, report)
        t_hmc = time.perf_counter() - t0
        mean_rate = draws["sum"] / draws["n"]
        rows.append((f"posterior mean under the true network (HMC, {draws['n']} draws per trial)",
                     r2(mean_rate), tenths(mean_rate)))
        rows.append(("one posterior draw under the true network (the chains' last)",
                     r2(draws["last"]), tenths(draws["last"])))
    rows.append(("MAP under the true network, started at the true x0", r2(rate_near),
                 tenths(rate_near)))
    rate_rand = forward(x_rand).numpy()
    rows.append((f"MAP under the true network, best of {args.restarts} random starts",
                 r2(rate_rand), tenths(rate_rand)))
    for run in args.lfads:
        path = Path(run) / "posterior.h5"
        with h5py.File(path, "r") as f:
            pred = f["valid_output_params"][keep].astype(np.float64)
            ic_mean = torch.tensor(f["valid_ic_mean"][keep], dtype=torch.float64)
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

    for item in args.rates:
        label, sep, files = item.partition("=")
        if not sep or not files:
            raise ValueError(f"--rates: expected LABEL=FILE[,FILE...], got {item!r}")
        preds = []
        for path in files.split(","):
            with h5py.File(path, "r") as f:
                preds.append(f["valid_output_params"][keep].astype(np.float64))
            if preds[-1].shape != truth.shape:
                raise ValueError(f"{path}: valid_output_params has shape {preds[-1].shape}, "
                                 f"expected {truth.shape}")
        pred = np.mean(preds, axis=0)
        rows.append((label, r2(pred), tenths(pred)))
        runs.append(f"- {label}: mean of " + ", ".join(f"`{path}`" for path in files.split(",")))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    lines = [
        "# What the demo's spikes support, given the true network",
        "",
        f"Data: synth.chaotic_rnn(seed={args.seed}, burn_in_bins={args.burn_in}), "
        f"{truth.shape[0]} of its {n_valid} validation trials x {n_bins} bins x {truth.shape[2]} neurons. "
        f"Commit {commit}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread(s); MAP fit next to the truth "
        f"{t_near:.0f} s.",
        "",
    ]
    if trace:
        lines += [
            f"HMC: {args.hmc_iters} iterations per trial ({args.hmc_adapt} tuning the step "
            f"size, not averaged), {args.hmc_leapfrog} leapfrog steps each, started at the true "
            f"x0; acceptance {float(acceptance.mean()):.2f} (trials "
            f"{float(acceptance.min()):.2f}-{float(acceptance.max()):.2f}); {t_hmc:.0f} s.",
            "",
            "| iteration | R^2 of one draw | R^2 of the mean of the draws so far |",
            "|---|---|---|",
        ] + [f"| {it} | {one:.4f} | {mean:.4f} |" for it, one, mean, _ in trace] + [""]
    lines += [
        f"Trials where the MAP fit next to the true x0 has the lowest objective found: "
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
        lines += ["", "LFADS runs (`lfads-fast demo --out NAME`) and rate files:", ""] + runs
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
