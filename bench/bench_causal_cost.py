"""What streaming costs in accuracy: models trained with the causal options against the
bidirectional model, the same data and the same training time, scored by the valid R^2 of
their posterior-mean rates against the true rates (the demo's synthetic chaotic-RNN data).

Variants (all with the demo's model and training settings, lfads_fast/demo.py):
  bidirectional   IC from all bins (window mode only)
  ic_first_K      IC from the first K bins (streamable: no controller)
  ic_first_K_con  IC from the first K bins + a causal controller (ci_enc_causal), co_dim 4

    python bench/bench_causal_cost.py [--minutes 4] [--ic-bins 10] [--variants a,b,c]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from lfads_fast import data, metrics, nlb, ops, synth  # noqa: E402
from lfads_fast.demo import DEMO_MODEL, DEMO_TRAIN  # noqa: E402
from lfads_fast.model import LFADS  # noqa: E402
from lfads_fast.train import Trainer, TrainConfig, config_for_data, load_model  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import commit, cpu_name  # noqa: E402


def variants(K):
    return {
        "bidirectional": {},
        f"ic_first_{K}": dict(ic_enc_seq_len=K),
        f"ic_first_{K}_con": dict(ic_enc_seq_len=K, ci_enc_causal=True, co_dim=4, ci_enc_dim=32,
                                  con_dim=32),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0, help="training time per variant")
    ap.add_argument("--ic-bins", type=int, default=10, help="ic_enc_seq_len of the causal variants")
    ap.add_argument("--variants", default=None, help="comma-separated subset (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None,
                    help="an NLB-layout file (e.g. mc_maze_small_train.h5): K-fold CV on it instead")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ops.set_num_threads(args.threads)
    if args.data:
        args.out = args.out or str(HERE / "results" / "causal_cost_nlb_cpu.md")
        return real_data(args)
    args.out = args.out or str(HERE / "results" / "causal_cost_cpu.md")
    tmp = Path(tempfile.mkdtemp(prefix="causal_cost_"))
    sd = synth.chaotic_rnn(seed=args.seed)
    ds = data.load_dataset(synth.save_h5(sd, tmp / "data.h5"))
    all_v = variants(args.ic_bins)
    chosen = args.variants.split(",") if args.variants else list(all_v)
    K = args.ic_bins
    rows = []
    for name in chosen:
        cfg = config_for_data(ds, **{**DEMO_MODEL, **all_v[name]})
        model = LFADS(cfg, seed=args.seed)
        tc = TrainConfig(**{**DEMO_TRAIN, "seed": args.seed, "time_budget": 60.0 * args.minutes})
        fit = Trainer(model, ds, tc, tmp / name, progress=False).fit()
        best = load_model(fit.best_checkpoint)
        rates = best.forward(ds.valid.encod_data)["output_params"]
        truth = ds.valid.truth
        row = (name, fit.epochs, metrics.r2(rates, truth), metrics.r2(rates[:, :K], truth[:, :K]),
               metrics.r2(rates[:, K:], truth[:, K:]))
        rows.append(row)
        print(row, flush=True)
    lines = [
        "# What causality costs (synthetic chaotic-RNN data)",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s); shared with other "
        "jobs during the run (epochs reached in the budget vary with the load)",
        f"- commit: {commit()}; data: synth.chaotic_rnn(seed={args.seed}) ({ds.train.n_trials} train / "
        f"{ds.valid.n_trials} valid trials, {ds.encod_seq_len} bins x {ds.encod_data_dim} neurons)",
        f"- model and training: lfads_fast.demo's (gen 100, fac 40, ic_enc 32, ic_dim 32, dropout 0.1), "
        f"{args.minutes:g} min each; R^2 of the posterior-mean rates (LFADS.forward, which the "
        "real-time library reproduces) against the true rates, valid trials",
        "",
        f"| variant | epochs | R^2 all bins | R^2 first {K} bins | R^2 after bin {K} |",
        "|---|---|---|---|---|",
    ]
    for name, ep, a, b, c in rows:
        lines.append(f"| {name} | {ep} | {a:.4f} | {b:.4f} | {c:.4f} |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def real_data(args):
    """K-fold CV on an NLB-layout file (train_spikes_heldin / heldout, train_behavior): per
    fold, train on the other trials (a fifth of them for validation), score the test trials'
    co-bps (held-out neurons from the held-in spikes, posterior means) and velocity R^2 (ridge
    fitted on the training trials' rates, lfads_fast.readout)."""
    import h5py

    from lfads_fast import readout

    with h5py.File(args.data, "r") as f:
        heldin, heldout = f["train_spikes_heldin"][()], f["train_spikes_heldout"][()]
        behavior = f["train_behavior"][()]
    n, T, n_in = heldin.shape
    recon = np.concatenate([heldin, heldout], axis=2)
    cols = np.arange(n_in, recon.shape[2])
    K = args.ic_bins
    models = {
        "bidirectional": {},
        f"causal_ic_{K}": dict(ic_enc_seq_len=K, ci_enc_causal=True),
    }
    chosen = args.variants.split(",") if args.variants else list(models)
    fold_of = np.random.default_rng(args.seed).permutation(n) % args.folds
    tmp = Path(tempfile.mkdtemp(prefix="causal_cost_nlb_"))
    results = {}
    for name in chosen:
        scores = []
        for k in range(args.folds):
            test = fold_of == k
            train_idx = np.flatnonzero(~test)
            valid_idx, fit_idx = train_idx[: len(train_idx) // 5], train_idx[len(train_idx) // 5 :]
            ds = data.from_arrays(heldin[fit_idx], heldin[valid_idx], train_recon_data=recon[fit_idx],
                                  valid_recon_data=recon[valid_idx])
            cfg = config_for_data(ds, **{**REAL_MODEL, **models[name]})
            model = LFADS(cfg, seed=args.seed + k)
            tc = TrainConfig(**{**REAL_TRAIN, "seed": args.seed + k, "time_budget": 60.0 * args.minutes})
            fit = Trainer(model, ds, tc, tmp / f"{name}_{k}", progress=False).fit()
            best = load_model(fit.best_checkpoint)
            rates_train = best.forward(heldin[train_idx])["output_params"]
            rates_test = best.forward(heldin[test])["output_params"]
            cobps = metrics.co_bps(rates_test, recon[test], cols)
            dec = readout.fit_ridge(list(rates_train[:, :, :n_in]), list(behavior[train_idx]), lags=[0],
                                    folds=5)
            pred = rates_test[:, :, :n_in].reshape(-1, n_in) @ dec.W.T + dec.b
            vel = nlb.r2_uniform(behavior[test].reshape(-1, behavior.shape[2]), pred)
            scores.append((cobps, vel, fit.epochs))
            print(name, k, scores[-1], flush=True)
        results[name] = np.array(scores)
    lines = [
        f"# What causality costs (real data, {args.folds}-fold CV)",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s); shared with other "
        "jobs during the run",
        f"- commit: {commit()}; data: {Path(args.data).name} ({n} trials, {T} bins of 5 ms, {n_in} held-in + "
        f"{len(cols)} held-out neurons; CC-BY-4.0, DANDI 000140, Churchland et al., Pei et al. 2021)",
        f"- model: {', '.join(f'{k} {v}' for k, v in REAL_MODEL.items())}; {args.minutes:g} min per fold; "
        "posterior-mean rates; velocity: ridge on the held-in rates (lag 0: the file's behaviour is "
        "already shifted by NLB's lag), alpha by CV on the training trials",
        "",
        "| variant | co-bps (mean +- sd over folds) | velocity R^2 | epochs (mean) |",
        "|---|---|---|---|",
    ]
    for name, sc in results.items():
        lines.append(f"| {name} | {sc[:, 0].mean():.4f} +- {sc[:, 0].std():.4f} | "
                     f"{sc[:, 1].mean():.4f} +- {sc[:, 1].std():.4f} | {sc[:, 2].mean():.0f} |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


REAL_MODEL = dict(ic_enc_dim=64, ic_dim=64, ci_enc_dim=64, con_dim=64, co_dim=4, gen_dim=100, fac_dim=40,
                  dropout_rate=0.3, kl_ic_scale=1e-4, kl_co_scale=1e-4)
REAL_TRAIN = dict(batch_size=25, lr_init=5e-3, lr_patience=5, lr_decay=0.7, kl_increase_epoch=20,
                  l2_increase_epoch=20, max_epochs=100_000, time_budget_lr_factor=0.25)


if __name__ == "__main__":
    main()
