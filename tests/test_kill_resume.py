"""Training killed with SIGKILL at random moments, again and again, then resumed: the directory
is consistent after every kill and the final state is bit-identical to an uninterrupted run's,
with and without a controller (docs/reliability.md)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lfads_fast import LFADS, ops, synth
from lfads_fast.train import Trainer, TrainConfig, config_for_data, load_checkpoint

KILLS = 5  # per configuration; each at a random moment of the training
THREADS = 2  # results are identical for the same seed and thread count
MODEL = dict(ic_enc_dim=8, ic_dim=4, gen_dim=12, fac_dim=4, co_dim=0, ci_enc_dim=0, con_dim=0,
             dropout_rate=0.1)
CONTROLLER = dict(co_dim=2, ci_enc_dim=6, con_dim=6)
TRAIN = dict(batch_size=8, max_epochs=24, lr_init=1e-2, kl_increase_epoch=2, l2_increase_epoch=2)
# Kill delays are drawn from [0, MAX_DELAY_S] after the child is ready (one epoch takes about
# 0.1-0.3 s here, so the kills fall inside the 24 epochs), from a seeded generator; whatever the moment, the assertions must hold.
MAX_DELAY_S = 0.8

_CHILD = """
import sys
from lfads_fast import LFADS, ops, synth
from lfads_fast.train import Trainer, TrainConfig, config_for_data
ops.set_num_threads({threads})
ds = synth.chaotic_rnn(n_conditions=10, trials_per_condition=4, train_per_condition=3,
                       n_bins=20, n_neurons=16, seed=5).to_dataset()
model = LFADS(config_for_data(ds, **{model}), seed=3)
trainer = Trainer(model, ds, TrainConfig(**{train}), sys.argv[1], progress=False)
print("ready", flush=True)
trainer.fit(resume=True)
"""


def dataset():
    return synth.chaotic_rnn(n_conditions=10, trials_per_condition=4, train_per_condition=3,
                             n_bins=20, n_neurons=16, seed=5).to_dataset()


def timeless(history):
    return [{k: v for k, v in row.items() if k not in ("train_s", "epoch_s", "time_s")}
            for row in history]


def kill_and_resume(code, out, rng, max_delay):
    """Runs the child on out until it finishes, killing it KILLS times after a random delay
    in [0, max_delay] s; checks the directory after each kill; returns the epochs of last.h5
    seen after the kills (None: none yet)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    kills, epochs_seen = 0, []
    while True:
        child = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        if kills < KILLS:
            time.sleep(float(rng.uniform(0, max_delay)))
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                kills += 1
        _, err = child.communicate(timeout=120)
        if child.returncode == 0:
            break
        assert child.returncode == -signal.SIGKILL, err
        epochs_seen.append(check_after_kill(out))
    assert kills == KILLS
    return epochs_seen


def check_after_kill(out):
    """What a kill may leave: intact checkpoints (temporary files aside, removed at the next
    start), a best checkpoint that is last.h5's best or a pending one the resume completes,
    and logs at most one epoch behind last.h5."""
    ckpts = out / "checkpoints"
    last_path, best_path, pending = ckpts / "last.h5", ckpts / "best.h5", ckpts / "best.next.h5"
    if not last_path.exists():
        return None
    last = load_checkpoint(last_path)
    assert (out / "config.yaml").is_file()
    best_epoch = last.state["early_stopping"]["best_epoch"] + 1
    candidates = [load_checkpoint(p).epoch for p in (best_path, pending) if p.exists()]
    assert best_epoch in candidates, (best_epoch, candidates)
    if (out / "log.json").exists():
        rows = json.loads((out / "log.json").read_text())
        assert rows in (last.state["history"], last.state["history"][:-1])
    return last.epoch


@pytest.mark.parametrize("controller", [False, True], ids=["no_controller", "controller"])
def test_killed_at_random_moments_resumes_bit_identically(tmp_path, controller):
    model_kw = dict(MODEL, **(CONTROLLER if controller else {}))
    code = _CHILD.format(threads=THREADS, model=model_kw, train=TRAIN)
    rng = np.random.default_rng(17 + controller)
    max_delay = MAX_DELAY_S
    for attempt in range(4):
        out = tmp_path / f"killed_{attempt}"
        epochs_seen = kill_and_resume(code, out, rng, max_delay)
        # Go on only when a kill landed inside the training, not after its end; on a machine
        # fast enough to finish first, start over with shorter delays.
        if any(e is None or e < TRAIN["max_epochs"] for e in epochs_seen):
            break
        max_delay /= 3
    else:
        raise AssertionError(f"no kill landed inside the training: {epochs_seen}")

    old = ops.get_num_threads()
    ops.set_num_threads(THREADS)
    try:
        ds = dataset()
        full = Trainer(LFADS(config_for_data(ds, **model_kw), seed=3), ds, TrainConfig(**TRAIN),
                       tmp_path / "full", progress=False)
        full.fit()
    finally:
        ops.set_num_threads(old)
    resumed = load_checkpoint(out / "checkpoints" / "last.h5")
    assert resumed.epoch == TRAIN["max_epochs"]
    want = {"flat": full.model.flat, "adam_m": full.adam_m, "adam_v": full.adam_v}
    for name, array in want.items():
        assert np.array_equal(getattr(resumed, name), array), name
    assert timeless(resumed.state["history"]) == timeless(full.history)
    best = load_checkpoint(out / "checkpoints" / "best.h5")
    full_best = load_checkpoint(full.best_checkpoint)
    assert best.epoch == full_best.epoch and np.array_equal(best.flat, full_best.flat)
    assert json.loads((out / "log.json").read_text()) == resumed.state["history"]
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp_")]
