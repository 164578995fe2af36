"""Stitching: quality on synthetic multi-session data, and the cost of mixed-session batches.

(a) Quality. One chaotic RNN (100 units, conditions shared) recorded in 5 sessions, each seeing
    a different random subset of 15-25 units with few trials. A stitched model (PCR read-ins,
    frozen) is trained on all sessions; for comparison, one single-session model per session
    is trained on that session alone with the same budget: the same number of steps with the
    same trials of that session per step (batches of the stitched model hold that many
    trials of every session), so every session sees the same data for the same number of
    updates and the total compute is about equal. Each model keeps the parameters with the
    lowest reconstruction loss on its valid spikes (lfads-torch's best checkpoint; the true
    rates play no part in it). Reported per session: the R^2 of the inferred rates
    (posterior means) against the true rates on held-out trials (the valid split), with the
    Gaussian-smoothing baseline for scale; and, for the stitched model, the mean over session
    pairs and factors of the correlation between condition-averaged factor trajectories (the
    same conditions seen through different neurons should give the same factors).
(b) Speed. Median time of one training step (forward + backward + Adam) of a multi-session
    model on a batch mixing 5 sessions against a batch of the same total size from one
    session, measured interleaved in the same run; a single-session model without read-in
    is timed alongside for reference.

Writes bench/results/stitching_cpu.md.

    python bench/bench_stitching.py [--steps 1200] [--threads 1] [--repeats 15]

On a machine shared with other jobs, one thread avoids OpenMP threads waiting on each other
(at two threads a busy 2-core machine made a small step seven times slower).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lfads_fast import LFADS, LFADSConfig, metrics, ops, stitching, synth  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import commit, cpu_name  # noqa: E402

DATA = dict(n_sessions=5, neurons_per_session=[15, 20, 25, 20, 15], n_conditions=40,
            trials_per_condition=5, train_per_condition=4, n_units=100, n_bins=50, seed=0)
MODEL = dict(ic_enc_dim=32, ci_enc_dim=0, con_dim=0, co_dim=0, ic_dim=32, gen_dim=64,
             fac_dim=16, dropout_rate=0.1, l2_gen_scale=1e-3, kl_ic_scale=1e-4)
SHARED_DIM = 16
BATCH_PER_SESSION = 16
LR = 5e-3
# The KL and L2 terms ramp up over this fraction of the steps (as lfads-torch's epoch ramps).
RAMP_FRACTION = 0.3
# Steps between validation losses for the choice of the best parameters.
EVAL_EVERY = 50
SPEED = dict(batch=100, sessions=[30, 45, 60, 40, 50], encod_data_dim=40, seq_len=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(HERE / "results" / "stitching_cpu.md"))
    args = ap.parse_args()
    ops.set_num_threads(args.threads)

    lines = [
        "# Stitching on the CPU: quality and mixed-batch speed",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads (shared with "
        "other jobs: timings are medians of interleaved runs)",
        f"- commit: {commit()}",
        f"- python {platform.python_version()}, numpy {np.__version__}; float32",
        f"- command: python bench/bench_stitching.py --steps {args.steps} --threads {args.threads} "
        f"--repeats {args.repeats}",
        "",
    ]
    print("\n".join(lines), flush=True)
    lines += quality(args.steps)
    lines += speed(args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


# ---------------------------------------------------------------------------------- quality


def quality(steps: int) -> list[str]:
    sessions = [d.to_dataset() for d in synth.chaotic_rnn_sessions(**DATA)]
    out = [
        "## (a) Quality on synthetic multi-session data",
        "",
        f"- data: synth.chaotic_rnn_sessions({', '.join(f'{k}={v}' for k, v in DATA.items())}): "
        f"train/valid trials per session {[ds.train.n_trials for ds in sessions]} / "
        f"{[ds.valid.n_trials for ds in sessions]}, {DATA['n_bins']} bins of 10 ms",
        f"- model: {', '.join(f'{k}={v}' for k, v in MODEL.items())}; stitched: encod_data_dim="
        f"{SHARED_DIM} (PCR read-ins from condition averages, frozen); single-session: "
        "encod_data_dim = the session's neurons",
        f"- training: {steps} Adam steps, lr {LR}, gradient clip 200, KL/L2 ramps over the first "
        f"{RAMP_FRACTION:.0%} of the steps, {BATCH_PER_SESSION} trials per session per step "
        f"(stitched batch: {BATCH_PER_SESSION * DATA['n_sessions']} trials)",
        "- model choice: each model keeps its parameters of lowest reconstruction loss on its "
        "valid spikes (stitched: the mean over sessions), checked every "
        f"{EVAL_EVERY} steps once the ramps are done",
        "- R^2: pooled over bins and neurons of the valid trials, posterior-mean rates against the "
        "true rates; smoothing: best Gaussian kernel chosen on train",
        "",
    ]
    print("\n".join(out), flush=True)

    t0 = time.perf_counter()
    cfg = stitching.config_for_sessions(sessions, SHARED_DIM, **MODEL)
    stitched = LFADS(cfg, seed=0)
    stitching.init_session_layers(stitched, sessions)
    rng = np.random.default_rng(1)

    def stitched_batches():
        while True:
            for parts in stitching.session_batches(sessions, BATCH_PER_SESSION, rng):
                batch = stitched.make_session_batch(parts, check_counts=False)
                yield batch, stitched.draw_noise(batch, rng)

    valid = stitched.make_session_batch([(s, ds.valid.encod_data, ds.valid.recon_data)
                                         for s, ds in enumerate(sessions)])
    best_stitched = train(stitched, stitched_batches(), steps,
                          (valid, stitched.draw_noise(valid, rng, train=False, sample=False)))
    t_stitched = time.perf_counter() - t0
    r2_stitched = [valid_r2(stitched, ds, s) for s, ds in enumerate(sessions)]

    t0 = time.perf_counter()
    r2_single, best_single = [], []
    for s, ds in enumerate(sessions):
        model = LFADS(LFADSConfig(encod_data_dim=ds.encod_data_dim, encod_seq_len=ds.encod_seq_len,
                                  **MODEL), seed=0)
        own_rng = np.random.default_rng(100 + s)

        def single_batches(ds=ds, model=model, own_rng=own_rng):
            while True:
                for (_, encod, recon, _) in (p[0] for p in stitching.session_batches(
                        [ds], BATCH_PER_SESSION, own_rng)):
                    batch = model.make_batch(encod, recon, check_counts=False)
                    yield batch, model.draw_noise(batch.size, own_rng)

        valid = model.make_batch(ds.valid.encod_data, ds.valid.recon_data)
        best_single.append(train(model, single_batches(), steps,
                                 (valid, model.draw_noise(valid, own_rng, train=False, sample=False))))
        r2_single.append(valid_r2(model, ds, None))
    t_single = time.perf_counter() - t0
    r2_smooth = [metrics.best_smoothing_r2(ds.train.encod_data, ds.train.truth,
                                           eval_spikes=ds.valid.encod_data,
                                           eval_truth=ds.valid.truth).r2 for ds in sessions]

    out += ["| session | neurons | smoothing R^2 | single-session R^2 | stitched R^2 |",
            "|---|---|---|---|---|"]
    for s, ds in enumerate(sessions):
        out.append(f"| {s} | {ds.encod_data_dim} | {r2_smooth[s]:.3f} | {r2_single[s]:.3f} | "
                   f"{r2_stitched[s]:.3f} |")
    out.append(f"| mean | | {np.mean(r2_smooth):.3f} | {np.mean(r2_single):.3f} | "
               f"{np.mean(r2_stitched):.3f} |")
    wins = sum(a > b for a, b in zip(r2_stitched, r2_single))
    consistency = factor_consistency(stitched, sessions)
    shuffled = factor_consistency(stitched, sessions, np.random.default_rng(2))
    out += [
        "",
        f"Stitched R^2 higher than single-session in {wins} of {len(sessions)} sessions.",
        f"Condition-averaged factor consistency across sessions (mean Pearson r over session "
        f"pairs and factors, all trials): stitched {consistency:.3f}; with the conditions of "
        f"sessions 1-4 permuted (reference: the common time course alone) {shuffled:.3f}.",
        f"Parameters kept (lowest validation reconstruction loss, checked every {EVAL_EVERY} "
        f"steps after the ramps): stitched step {best_stitched}, single-session steps "
        f"{best_single}.",
        f"Training time: stitched {t_stitched:.0f} s, 5 single-session models {t_single:.0f} s "
        "in total.",
        "",
    ]
    print("\n".join(out[-(len(sessions) + 9):]), flush=True)
    return out


def train(model: LFADS, batches, steps: int, valid) -> int:
    """Adam with KL and L2 ramps (the read-ins stay as the mask says), keeping the parameters
    of the lowest validation reconstruction loss after the ramps (lfads-torch's best
    checkpoint; it uses the valid spikes, never the true rates).

    Args:
        valid: (batch, noise) of the validation trials, posterior means, no dropout.

    Returns:
        The step whose parameters the model ends with.
    """
    mask = model.trainable_mask()
    m, v = np.zeros_like(model.flat), np.zeros_like(model.flat)
    ramp_steps = max(int(RAMP_FRACTION * steps), 1)
    best, best_step, best_flat = np.inf, 0, model.flat.copy()
    for step in range(1, steps + 1):
        batch, noise = next(batches)
        ramp = min(step / ramp_steps, 1.0)
        _, grad = model.loss_and_grads(batch, noise, kl_ramp=ramp, l2_ramp=ramp)
        ops.adam_step(model.flat, grad, m, v, lr=LR, max_grad_norm=200.0, step=step, mask=mask)
        if step >= ramp_steps and (step % EVAL_EVERY == 0 or step == steps):
            recon = model.loss_and_grads(*valid, grads=False)[0]["recon"]
            if recon < best:
                best, best_step, best_flat = recon, step, model.flat.copy()
    model.flat[...] = best_flat
    return best_step


def valid_r2(model: LFADS, ds, session) -> float:
    rates = model.forward(ds.valid.encod_data, session=session)["output_params"]
    return metrics.r2(rates, ds.valid.truth)


def factor_consistency(model: LFADS, sessions, shuffle: np.random.Generator | None = None) -> float:
    """Mean over session pairs and factors of the correlation of condition-averaged factors.

    shuffle: permute the conditions of every session but the first independently (a
    reference level: what agreement the shared time course alone gives).
    """
    averages = []
    for s, ds in enumerate(sessions):
        encod = np.concatenate([ds.train.encod_data, ds.valid.encod_data])
        cond = np.concatenate([ds.train.extra["conditions"], ds.valid.extra["conditions"]])
        factors = model.forward(encod, session=s)["factors"]
        avg = np.stack([factors[cond == c].mean(axis=0) for c in np.unique(cond)])
        if shuffle is not None and s > 0:
            avg = avg[shuffle.permutation(len(avg))]
        averages.append(avg)
    r = []
    for i in range(len(averages)):
        for j in range(i + 1, len(averages)):
            a = averages[i].reshape(-1, averages[i].shape[-1])
            b = averages[j].reshape(-1, averages[j].shape[-1])
            r += [np.corrcoef(a[:, f], b[:, f])[0, 1] for f in range(a.shape[1])]
    return float(np.mean(r))


# ---------------------------------------------------------------------------------- speed


def speed(repeats: int) -> list[str]:
    B, T, Ne = SPEED["batch"], SPEED["seq_len"], SPEED["encod_data_dim"]
    neurons = SPEED["sessions"]
    S = len(neurons)
    shared = dict(encod_seq_len=T, dropout_rate=0.05)  # defaults otherwise (lfads-torch's)
    multi = LFADS(LFADSConfig(encod_data_dim=Ne, session_neurons=neurons, **shared), seed=0)
    single = LFADS(LFADSConfig(encod_data_dim=neurons[0], **shared), seed=0)
    rng = np.random.default_rng(0)

    def counts(b, n):
        return rng.poisson(0.3, (b, T, n)).astype(np.float32)

    per = B // S
    mixed = multi.make_session_batch([(s, counts(per, n)) for s, n in enumerate(neurons)])
    one = multi.make_session_batch([(0, counts(B, neurons[0]))])
    plain = single.make_batch(counts(B, neurons[0]))
    cases = {"multi-session model, 5 sessions x 20 trials": (multi, mixed),
             "multi-session model, 1 session x 100 trials": (multi, one),
             "single-session model (no read-in), 100 trials": (single, plain)}
    state = {name: (model.draw_noise(batch, rng), np.zeros_like(model.flat),
                    np.zeros_like(model.flat)) for name, (model, batch) in cases.items()}
    times = {name: [] for name in cases}
    for r in range(repeats + 1):  # interleaved, so that load from other jobs hits all alike
        for name, (model, batch) in cases.items():
            noise, m, v = state[name]
            t0 = time.perf_counter()
            _, grad = model.loss_and_grads(batch, noise)
            ops.adam_step(model.flat, grad, m, v, lr=1e-4, step=r + 1, mask=model.trainable_mask())
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    names = list(cases)
    ratio = med[names[0]] / med[names[1]]
    out = [
        "## (b) Speed of a mixed-session batch",
        "",
        f"- sizes: T = {T}, batch {B}; multi-session model with encod_data_dim {Ne} and sessions of "
        f"{neurons} neurons; otherwise LFADSConfig defaults (ic_enc 64, ci_enc 64, con 64, co 4, "
        "ic 64, gen 100, fac 40), dropout 0.05",
        f"- step = loss_and_grads + adam_step; median of {repeats} steps after 1 warm-up, the three "
        "cases interleaved",
        "",
        "| case | median step (ms) |",
        "|---|---|",
    ]
    out += [f"| {name} | {med[name] * 1e3:.1f} |" for name in names]
    out += ["", f"Mixed / one-session batch of the same size: {ratio:.2f}x (target <= 1.3x).", ""]
    print("\n".join(out), flush=True)
    return out


if __name__ == "__main__":
    main()
