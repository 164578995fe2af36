"""Reliability: the run lock, checkpoint integrity and the fallback on resume, one commit point
per epoch, the command line's error boundary, checks before expensive work, and the
validation of configs, data, batches and kernel arguments (docs/reliability.md)."""
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading

import h5py
import numpy as np
import pytest

from lfads_fast import LFADS, LFADSConfig, cli, data, ops, resources, rundir, stitching, synth
from lfads_fast.model import param_layout
from lfads_fast.train import (NonFiniteLossError, Trainer, TrainConfig, config_for_data,
                              load_checkpoint, load_model)

TINY_MODEL = dict(ic_enc_dim=8, ic_dim=4, gen_dim=12, fac_dim=4, co_dim=0, ci_enc_dim=0,
                  con_dim=0, dropout_rate=0.0)
TINY_TRAIN = dict(batch_size=16, max_epochs=3, lr_init=1e-2, kl_increase_epoch=1,
                  l2_increase_epoch=1)
CLI_TINY = ["--set", "model.ic_enc_dim=8", "--set", "ic_dim=4", "--set", "gen_dim=12",
            "--set", "fac_dim=4", "--set", "co_dim=0", "--set", "ci_enc_dim=0",
            "--set", "con_dim=0", "--set", "train.batch_size=16", "--set", "max_epochs=2",
            "--set", "lr_init=1e-2"]
# The machine's memory as the size checks see it in these tests, so that they refuse the
# same files on every machine.
FAKE_MEMORY = 2 * 2**30


@pytest.fixture(scope="module")
def tiny():
    return synth.chaotic_rnn(n_conditions=10, trials_per_condition=4, train_per_condition=3,
                             n_bins=20, n_neurons=16, seed=5).to_dataset()


@pytest.fixture(scope="module")
def data_file(tiny, tmp_path_factory):
    sd = synth.chaotic_rnn(n_conditions=10, trials_per_condition=4, train_per_condition=3,
                           n_bins=20, n_neurons=16, seed=5)
    return str(synth.save_h5(sd, tmp_path_factory.mktemp("data") / "tiny.h5"))


@pytest.fixture
def small_machine(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: FAKE_MEMORY)


def make_trainer(ds, out, model_kw=None, **train_kw):
    cfg = config_for_data(ds, **dict(TINY_MODEL, **(model_kw or {})))
    return Trainer(LFADS(cfg, seed=3), ds, TrainConfig(**dict(TINY_TRAIN, **train_kw)), out,
                   progress=False)


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def flip_bytes(path, key, n=16, seed=0):
    """Flips n bytes inside the stored data of dataset key (contiguous layout)."""
    with h5py.File(path, "r") as f:
        offset, size = f[key].id.get_offset(), f[key].id.get_storage_size()
    rng = np.random.default_rng(seed)
    with open(path, "r+b") as fh:
        for pos in rng.choice(size, size=n, replace=False):
            fh.seek(offset + int(pos))
            b = fh.read(1)[0]
            fh.seek(offset + int(pos))
            fh.write(bytes([b ^ 0xFF]))


def rewrite_checkpoint(path, edit_state=None, arrays=None):
    """Rewrites a checkpoint with an edited state and/or arrays and fresh checksums (a file
    that is intact but says something else)."""
    from lfads_fast.train import _checksum

    with h5py.File(path, "r") as f:
        content = {k: f[k][()] for k in f if k != "checksums"}
    state = json.loads(content["state_json"])
    if edit_state:
        edit_state(state)
    content["state_json"] = json.dumps(state)
    content.update(arrays or {})
    sums = {k: _checksum(v if k == "state_json" else np.asarray(v)) for k, v in content.items()}
    os.unlink(path)
    with h5py.File(path, "w") as f:
        for k, v in content.items():
            f.create_dataset(k, data=v)
        f.create_dataset("checksums", data=json.dumps(sums))


# ------------------------------------------------------------------ run lock

_HOLDER = textwrap.dedent("""
    import sys, time
    from lfads_fast import rundir
    with rundir.run_lock(sys.argv[1], is_dir=sys.argv[2] == "dir"):
        print("locked", flush=True)
        time.sleep(120)
""")


def hold_lock(target, kind):
    """A separate process holding the run lock of a directory or an output file."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target), kind], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


@pytest.fixture
def lock_holder(tmp_path):
    """A separate process holding the run lock of tmp_path/run."""
    out = tmp_path / "run"
    child = hold_lock(out, "dir")
    yield out, child
    child.kill()
    child.wait()


def test_infer_refuses_an_output_file_another_process_writes(trained, data_file, tmp_path,
                                                             capsys):
    out = tmp_path / "posterior.h5"
    child = hold_lock(out, "file")
    try:
        code, _, err = run_cli(["infer", trained / "checkpoints" / "best.h5", data_file,
                                "--out", out, "--samples", "1"], capsys)
        one_line_error(code, err, f"process {child.pid}", str(out))
    finally:
        child.kill()
        child.wait()
    code, _, err = run_cli(["infer", trained / "checkpoints" / "best.h5", data_file,
                            "--out", out, "--samples", "1"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["posterior.h5"]  # no lock file left


def test_lock_refuses_a_second_trainer_and_names_the_holder(tiny, lock_holder):
    out, child = lock_holder
    with pytest.raises(rundir.RunLockedError, match=f"process {child.pid} holds its lock") as info:
        make_trainer(tiny, out).fit()
    assert info.value.pid == child.pid
    assert not (out / "checkpoints" / "last.h5").exists()


def test_lock_is_released_when_the_holder_is_killed(tiny, lock_holder):
    out, child = lock_holder
    child.kill()
    child.wait()
    result = make_trainer(tiny, out, max_epochs=1).fit()  # the kernel released the lock
    assert result.epochs == 1
    assert not (out / rundir.LOCK_NAME).exists()  # and the finished run removes its file


def test_cli_commands_refuse_a_locked_directory(data_file, lock_holder, tmp_path, capsys):
    out, child = lock_holder
    code, _, err = run_cli(["train", data_file, "--out", out, "--quiet", *CLI_TINY], capsys)
    one_line_error(code, err, str(out), f"process {child.pid}")
    code, _, err = run_cli(["demo", "--quick", "--out", out, "--minutes", "0.01"], capsys)
    one_line_error(code, err, f"process {child.pid}")


def test_lock_is_reentrant_in_its_thread_and_refused_in_another(tmp_path):
    seen = []
    with rundir.run_lock(tmp_path / "d"):
        with rundir.run_lock(tmp_path / "d"):  # the CLI takes it, then Trainer.fit
            pass

        def other():
            try:
                with rundir.run_lock(tmp_path / "d"):
                    seen.append("taken")
            except rundir.RunLockedError as e:
                seen.append(str(e))

        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert (tmp_path / "d" / rundir.LOCK_NAME).read_text().strip() == str(os.getpid())
    assert "another thread" in seen[0]
    with rundir.run_lock(tmp_path / "d"):  # free again
        pass


def test_two_trainers_started_together_one_wins(tiny, tmp_path):
    # Both pass any "already holds a run" check; the lock lets exactly one train.
    outcomes = []
    barrier = threading.Barrier(2)

    def go(seed):
        t = make_trainer(tiny, tmp_path / "shared", max_epochs=2, seed=seed)
        barrier.wait()
        try:
            outcomes.append(("done", t.fit().epochs))
        except rundir.RunLockedError:
            outcomes.append(("locked", None))

    threads = [threading.Thread(target=go, args=(s,)) for s in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(o[0] for o in outcomes) == ["done", "locked"]
    assert load_checkpoint(tmp_path / "shared" / "checkpoints" / "last.h5").epoch == 2


# ------------------------------------------------------------------ checkpoint integrity


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished 3-epoch run (its files are copied before a test damages them)."""
    out = tmp_path_factory.mktemp("trained")
    make_trainer(tiny, out).fit()
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("key", ["flat", "adam_m", "adam_v"])
def test_flipped_bytes_in_an_array_are_named(trained, tmp_path, key):
    path = copy_run(trained, tmp_path / "r") / "checkpoints" / "last.h5"
    flip_bytes(path, key)
    with pytest.raises(ValueError, match=f"damaged checkpoint: array '{key}' does not match"):
        load_checkpoint(path)


def test_damaged_state_is_named(trained, tmp_path):
    path = copy_run(trained, tmp_path / "r") / "checkpoints" / "last.h5"
    with h5py.File(path, "r+") as f:
        state = f["state_json"][()]
        raw = bytearray(state if isinstance(state, bytes) else state.encode())
        raw[raw.index(b'"lr"') + 7] ^= 0x01  # one digit of the learning rate
        del f["state_json"]
        f.create_dataset("state_json", data=bytes(raw))
    with pytest.raises(ValueError, match="array 'state_json' does not match"):
        load_checkpoint(path)


def test_random_damage_never_gives_another_exception(trained, tmp_path):
    src = trained / "checkpoints" / "last.h5"
    blob = src.read_bytes()
    rng = np.random.default_rng(11)
    outcomes = {"refused": 0, "read": 0}
    for i in range(40):
        damaged = bytearray(blob)
        if i % 4 == 0:
            damaged = damaged[: int(rng.integers(1, len(blob)))]  # truncated
        else:
            for pos in rng.integers(0, len(blob), size=int(rng.integers(1, 64))):
                damaged[pos] ^= int(rng.integers(1, 256))
        path = tmp_path / f"d{i}.h5"
        path.write_bytes(bytes(damaged))
        try:
            ckpt = load_checkpoint(path)
        except ValueError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
            continue
        # Whatever still reads must be exactly what was written (damage in unused bytes).
        good = load_checkpoint(src)
        assert np.array_equal(ckpt.flat, good.flat) and ckpt.state == good.state
        outcomes["read"] += 1
    assert outcomes["refused"] > 20


def test_infer_refuses_a_damaged_checkpoint(trained, data_file, tmp_path, capsys):
    path = copy_run(trained, tmp_path / "r") / "checkpoints" / "best.h5"
    flip_bytes(path, "flat")
    code, _, err = run_cli(["infer", path, data_file, "--out", tmp_path / "p.h5",
                            "--samples", "1"], capsys)
    one_line_error(code, err, "array 'flat' does not match its checksum")
    assert not (tmp_path / "p.h5").exists()


def test_resume_falls_back_to_best_when_last_is_damaged(tiny, trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    # With kl/l2 ramps of 1 epoch the burn-in is 2 epochs; best is at epoch index 2 or
    # earlier, and a full state: resuming from it is exact.
    flip_bytes(run / "checkpoints" / "last.h5", "flat")
    with pytest.warns(RuntimeWarning, match=r"last.h5 is damaged .*resuming from .*best.h5"):
        resumed = make_trainer(tiny, run, max_epochs=5).fit(resume=True)
    assert (run / "checkpoints" / "last.h5.damaged").exists()
    full = make_trainer(tiny, tmp_path / "full", max_epochs=5).fit()
    assert np.array_equal(load_checkpoint(resumed.last_checkpoint).flat,
                          load_checkpoint(full.last_checkpoint).flat)


def test_resume_goes_on_from_last_when_best_is_damaged(tiny, trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    flip_bytes(run / "checkpoints" / "best.h5", "adam_v")
    with pytest.warns(RuntimeWarning, match=r"best.h5 is damaged .*resuming from .*last.h5"):
        result = make_trainer(tiny, run, max_epochs=4).fit(resume=True)
    assert result.epochs == 4
    best = load_checkpoint(result.best_checkpoint)  # a fresh, intact best
    assert best.epoch == result.best_epoch + 1 >= 3


def test_both_checkpoints_damaged_is_a_clear_error(tiny, trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    flip_bytes(run / "checkpoints" / "best.h5", "flat")
    flip_bytes(run / "checkpoints" / "last.h5", "flat")
    with pytest.raises(ValueError, match="cannot resume: .*last.h5: damaged.*best.h5: damaged"):
        make_trainer(tiny, run, max_epochs=4).fit(resume=True)


def test_stale_temp_files_are_removed_at_start(tiny, trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    stale = [run / "checkpoints" / ".tmp_abc123.h5", run / ".tmp_log.csv"]
    for p in stale:
        p.write_bytes(b"partial")
    make_trainer(tiny, run, max_epochs=3).fit(resume=True)
    assert not any(p.exists() for p in stale)


def test_killed_between_last_and_best_is_completed_on_resume(tiny, tmp_path):
    # Simulate a kill after last.h5 was replaced and before best.next.h5 became best.h5.
    a = make_trainer(tiny, tmp_path / "a", max_epochs=2)
    a.fit()
    old_best = (tmp_path / "a" / "checkpoints" / "best.h5").read_bytes()
    b = make_trainer(tiny, tmp_path / "a", max_epochs=3)
    original = b._commit

    def killed_commit():
        b._save(b.last_checkpoint)
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after the rename ran

    b._commit = killed_commit
    with pytest.raises(KeyboardInterrupt):
        b.fit(resume=True)
    ckpts = tmp_path / "a" / "checkpoints"
    assert (ckpts / "best.next.h5").exists() and (ckpts / "best.h5").read_bytes() == old_best
    b._commit = original
    result = make_trainer(tiny, tmp_path / "a", max_epochs=3).fit(resume=True)
    assert result.epochs_this_call == 0 and not (ckpts / "best.next.h5").exists()
    last = load_checkpoint(ckpts / "last.h5")
    assert load_checkpoint(ckpts / "best.h5").epoch == last.state["early_stopping"]["best_epoch"] + 1
    assert_consistent(tmp_path / "a")


def test_killed_before_the_commit_drops_the_pending_best(tiny, tmp_path):
    a = make_trainer(tiny, tmp_path / "a", max_epochs=3)

    def killed_commit():
        raise KeyboardInterrupt

    a._commit = killed_commit
    with pytest.raises(KeyboardInterrupt):
        a.fit()  # epoch 0's best.next.h5 written, last.h5 never
    ckpts = tmp_path / "a" / "checkpoints"
    assert (ckpts / "best.next.h5").exists() and not (ckpts / "last.h5").exists()
    result = make_trainer(tiny, tmp_path / "a", max_epochs=3).fit(resume=True)
    assert result.epochs == 3 and result.epochs_this_call == 3
    assert_consistent(tmp_path / "a")


def assert_consistent(out):
    """best.h5, last.h5, log.csv and log.json of a run directory agree with each other."""
    ckpts = out / "checkpoints"
    last = load_checkpoint(ckpts / "last.h5")
    best = load_checkpoint(ckpts / "best.h5")
    assert best.epoch == last.state["early_stopping"]["best_epoch"] + 1 <= last.epoch
    assert best.state["history"] == last.state["history"][: best.epoch]
    rows = json.loads((out / "log.json").read_text())
    assert rows == last.state["history"]
    assert len((out / "log.csv").read_text().strip().splitlines()) == last.epoch + 1
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(rundir.TEMP_PREFIX)]


def test_a_finished_run_is_consistent(trained):
    assert_consistent(trained)


def test_fresh_start_removes_the_previous_runs_files(tiny, trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    t = make_trainer(tiny, run, max_epochs=1)

    def killed_commit():
        raise KeyboardInterrupt

    t._commit = killed_commit
    with pytest.raises(KeyboardInterrupt):
        t.fit()  # a fresh start killed in its first epoch
    ckpts = run / "checkpoints"
    assert not (ckpts / "last.h5").exists() and not (ckpts / "best.h5").exists()
    assert not (run / "log.csv").exists()


# ------------------------------------------------------------------ sizes and memory


def test_small_checkpoint_declaring_a_huge_generator_is_refused(trained, tmp_path, small_machine):
    path = copy_run(trained, tmp_path / "r") / "checkpoints" / "best.h5"

    def huge(state):
        state["model_config"]["gen_dim"] = 30_000

    rewrite_checkpoint(path, huge)
    assert path.stat().st_size < 100_000
    with pytest.raises(ValueError, match=r"flat has shape \(\d+,\) .* parameters stored, but "
                                         r"its config needs 27\d{8} "):
        load_model(path)


def test_compressed_checkpoint_declaring_huge_arrays_is_refused(trained, tmp_path, small_machine):
    path = copy_run(trained, tmp_path / "r") / "checkpoints" / "best.h5"
    with h5py.File(path, "r") as f:
        state = json.loads(f["state_json"][()])
    cfg = LFADSConfig.from_dict(dict(state["model_config"], gen_dim=30_000))
    n = sum(int(np.prod(s)) for _, s in param_layout(cfg))

    def huge(s):
        s["model_config"]["gen_dim"] = 30_000

    rewrite_checkpoint(path, huge)
    with h5py.File(path, "r+") as f:
        for key in ("flat", "adam_m", "adam_v"):
            del f[key]
            f.create_dataset(key, shape=(n,), dtype=np.float32, chunks=(2**20,),
                             compression="gzip")  # never written: a tiny file
    assert path.stat().st_size < 1_000_000
    with pytest.raises(resources.InsufficientMemoryError, match=r"needs about .* GB of memory"):
        load_checkpoint(path)


def test_compressed_data_file_declaring_80_gb_is_refused(tmp_path, small_machine, capsys):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        for split in ("train", "valid"):
            f.create_dataset(f"{split}_encod_data", shape=(100_000, 1000, 100), dtype=np.float32,
                             chunks=(1, 1000, 100), compression="gzip")
    assert path.stat().st_size < 1_000_000
    with pytest.raises(resources.InsufficientMemoryError, match=str(path)):
        data.load_dataset(path)
    code, _, err = run_cli(["train", path, "--out", tmp_path / "o", "--quiet"], capsys)
    one_line_error(code, err, str(path), "of memory")


def test_training_too_big_for_the_machine_is_refused_before_allocating(data_file, tmp_path,
                                                                        small_machine, capsys):
    code, _, err = run_cli(["train", data_file, "--out", tmp_path / "o", "--quiet",
                            "--set", "gen_dim=30000"], capsys)
    one_line_error(code, err, "training this model", "of memory")


# ------------------------------------------------------------------ the CLI's error boundary


@pytest.fixture(scope="module")
def checkpoint(trained):
    return str(trained / "checkpoints" / "best.h5")


@pytest.mark.parametrize("args, needles", [
    (["train", "DATA", "--out", "FILE/sub", "--quiet"], ["is a file, not a directory"]),
    (["train", "DATA", "--out", "FILE", "--quiet"], ["exists and is not a directory"]),
    (["infer", "CKPT", "DATA", "--out", "DIR"], ["is a directory; expected a file name"]),
    (["infer", "CKPT", "DATA", "--out", "FILE/p.h5"], ["not a directory"]),
    (["train", "DATA", "--out", "NEW", "--set", "gen_dim=[1, 2"], ["--set"]),
    (["train", "DATA", "--out", "NEW", "--set", "model.=3"], ["no field"]),
    (["train", "DATA", "--out", "NEW", "--set", "=3"], ["no such field"]),
    (["train", "DATA", "--out", "NEW", "--set", "gen_dim=1e400"], ["model.gen_dim must be"]),
    (["train", "DATA", "--out", "NEW", "--set", "gen_dim=" + "9" * 400], ["model.gen_dim must be"]),
    (["train", "DATA", "--out", "NEW", "--set", "lr_init=1e400"], ["train.lr_init must be"]),
    (["train", "DATA", "--out", "NEW", "--set", "ic_prior_mean=.nan"], ["ic_prior_mean"]),
    (["train", "DATA", "--out", "NEW", "--set", "loss_scale=.inf"], ["loss_scale"]),
    (["train", "DATA", "--out", "NEW", "--set", "recon_reduce_mean=maybe", "--quiet"], ["recon_reduce_mean"]),
    (["train", "DATA", "--out", "NEW", "--set", "session_neurons=[16]"],
     ["session_neurons is for several sessions"]),
    (["infer", "CKPT", "DATA", "--out", "NEW/p.h5", "--refine-lr", "1e400"], []),
])
def test_expected_failures_are_one_line(data_file, checkpoint, tmp_path, capsys, args, needles):
    (tmp_path / "FILE").write_text("not a directory")
    (tmp_path / "DIR").mkdir()
    subs = {"DATA": data_file, "CKPT": checkpoint}
    args = [subs.get(a, a) for a in args]
    args = [str(tmp_path / a) if a.split("/")[0] in ("FILE", "DIR", "NEW") else a for a in args]
    try:
        code, _, err = run_cli(args, capsys)
    except SystemExit as e:  # argparse's own one-line usage error
        code, err = e.code, capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        return
    if needles:
        one_line_error(code, err, *needles)
    else:
        assert code == 2 and "Traceback" not in err, err


def test_infer_to_a_directory_fails_before_the_work(checkpoint, data_file, tmp_path, capsys,
                                                     monkeypatch):
    from lfads_fast import posterior

    def never(*a, **k):
        raise AssertionError("the posterior was computed before the output was checked")

    monkeypatch.setattr(posterior, "write_posterior", never)
    (tmp_path / "d").mkdir()
    code, _, err = run_cli(["infer", checkpoint, data_file, "--out", tmp_path / "d"], capsys)
    one_line_error(code, err, "is a directory")


def test_out_of_memory_is_one_line(data_file, tmp_path, capsys, monkeypatch):
    from lfads_fast import train

    def oom(*a, **k):
        raise MemoryError("Unable to allocate 10.0 GiB")

    monkeypatch.setattr(train.Trainer, "fit", oom)
    code, _, err = run_cli(["train", data_file, "--out", tmp_path / "o", "--quiet", *CLI_TINY],
                           capsys)
    one_line_error(code, err, "out of memory", "10.0 GiB")


def test_unwritable_output_is_one_line(data_file, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(["train", data_file, "--out", ro / "o", "--quiet", *CLI_TINY],
                               capsys)
    finally:
        ro.chmod(0o700)
    one_line_error(code, err, str(ro / "o"))


def test_unexpected_errors_show_the_traceback_and_say_bug(data_file, tmp_path, capsys,
                                                          monkeypatch):
    from lfads_fast import train

    def bug(*a, **k):
        return {}["missing"]

    monkeypatch.setattr(train.Trainer, "fit", bug)
    code, _, err = run_cli(["train", data_file, "--out", tmp_path / "o", "--quiet", *CLI_TINY],
                           capsys)
    assert code == 3
    assert "Traceback" in err and "KeyError" in err and "this is a bug in lfads-fast" in err


def test_threads_are_bounded(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--threads", "5000", "demo", "--quick"])
    assert info.value.code == 2
    assert f"from 1 to {ops.MAX_THREADS}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threads must be an integer from 1 to"):
        ops.set_num_threads(5000)
    with pytest.raises(ValueError, match="threads"):
        ops.set_num_threads(0)


# ------------------------------------------------------------------ non-finite runs


@pytest.fixture(scope="module")
def sessions():
    found = synth.chaotic_rnn_sessions(n_sessions=2, neurons_per_session=[10, 12],
                                       n_conditions=8, trials_per_condition=4,
                                       train_per_condition=3, n_units=30, n_bins=15,
                                       max_firing_rate=60.0)
    return [d.to_dataset() for d in found]


def test_nonfinite_diagnostic_with_a_controller_names_the_session(sessions, tmp_path):
    cfg = stitching.config_for_sessions(sessions, 6, ic_enc_dim=8, ic_dim=4, gen_dim=10,
                                        fac_dim=4, co_dim=2, ci_enc_dim=6, con_dim=6,
                                        dropout_rate=0.1)
    model = LFADS(cfg, seed=3)
    stitching.init_session_layers(model, sessions)
    model.params["readout_b_1"][...] = 1e4  # session 1's rates overflow
    t = Trainer(model, sessions, TrainConfig(batch_size=8, max_epochs=2, max_nonfinite_steps=2),
                tmp_path, progress=False)
    rng_before = t.rng.bit_generator.state
    with pytest.raises(NonFiniteLossError) as info:
        t.fit()
    msg = str(info.value)
    assert "2 consecutive steps" in msg
    assert msg.split("no dropout): ")[1].startswith("session 1 (<arrays>).")
    assert rng_before != t.rng.bit_generator.state  # training drew from its own stream


def test_a_run_whose_every_step_was_skipped_fails(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_epochs=2, max_nonfinite_steps=100)
    original = t.model.loss_and_grads

    def nan_always(*args, **kwargs):
        terms, grad = original(*args, **kwargs)
        return dict(terms, loss=float("nan")), grad

    t.model.loss_and_grads = nan_always
    with pytest.raises(NonFiniteLossError, match="applied no step: all 4 steps") as info:
        t.fit()
    assert t.step == 0 and info.value.result.epochs == 2


def test_cli_exits_non_zero_when_every_step_was_skipped(data_file, tmp_path, capsys,
                                                        monkeypatch):
    from lfads_fast.model import LFADS as Model

    original = Model.loss_and_grads

    def nan_always(self, *args, **kwargs):
        terms, grad = original(self, *args, **kwargs)
        return dict(terms, loss=float("nan")), grad

    monkeypatch.setattr(Model, "loss_and_grads", nan_always)
    code, out, err = run_cli(["train", data_file, "--out", tmp_path / "o", "--quiet", *CLI_TINY,
                              "--set", "max_nonfinite_steps=100"], capsys)
    assert code == 2 and "applied no step" in err and "best epoch" not in out


# ------------------------------------------------------------------ validation gaps


@pytest.mark.parametrize("field, value", [
    ("ic_prior_mean", float("nan")), ("ic_prior_mean", float("inf")),
    ("loss_scale", float("inf")), ("loss_scale", float("nan")),
    ("recon_reduce_mean", "false"), ("train_readin", "yes"), ("recon_reduce_mean", 1),
    ("gen_dim", 12.0), ("gen_dim", "12"),
])
def test_config_refuses(field, value):
    with pytest.raises(ValueError, match=field):
        LFADSConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("lr_scheduler", "yes"), ("early_stopping", "false"), ("batch_size", 16.0),
])
def test_train_config_refuses(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    cfg = LFADSConfig(gen_dim=np.int64(12), encod_data_dim=np.int32(5), loss_scale=np.float32(2),
                      recon_reduce_mean=np.bool_(False), session_neurons=[np.int64(5)])
    assert type(cfg.gen_dim) is int and cfg.gen_dim == 12
    assert type(cfg.loss_scale) is float and type(cfg.recon_reduce_mean) is bool
    json.loads(cfg.to_json())  # numpy scalars would not serialise
    tc = TrainConfig(batch_size=np.int64(8), lr_init=np.float32(0.01), seed=np.uint8(3))
    assert type(tc.batch_size) is int and type(tc.seed) is int and type(tc.lr_init) is float


def test_complex_data_are_refused(tiny, tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f["train_data"] = tiny.train.encod_data.astype(np.complex64) + 1j
        f["valid_data"] = tiny.valid.encod_data
    with pytest.raises(ValueError, match=f"{path}: train_data must be real, got complex"):
        data.load_dataset(path)
    with pytest.raises(ValueError, match="must be real"):
        data.from_arrays(tiny.train.encod_data, tiny.valid.encod_data + 0j)


def test_all_nan_validation_split_is_refused_at_load(tiny, tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f["train_data"] = tiny.train.encod_data
        f["valid_data"] = np.full_like(tiny.valid.encod_data, np.nan)
    with pytest.raises(ValueError, match=f"{path}: valid_data has no observed bins"):
        data.load_dataset(path)


def test_a_batch_of_another_model_is_refused(tiny):
    a = LFADS(config_for_data(tiny, **TINY_MODEL))
    other = data.from_arrays(tiny.train.encod_data[:, :10], tiny.valid.encod_data[:, :10])
    b = LFADS(config_for_data(other, **TINY_MODEL))
    batch = b.make_batch(other.train.encod_data[:4])
    with pytest.raises(ValueError, match=r"batch.encod has shape \[10, 4, 16\] but this model "
                                         r"expects \[20, 4, 16\].*another model"):
        a.loss_and_grads(batch, None)
    a64 = LFADS(a.config, dtype=np.float64)
    with pytest.raises(ValueError, match="float32 but this model's parameters are float64"):
        a64.loss_and_grads(a.make_batch(tiny.train.encod_data[:4]), None)


def test_a_single_session_batch_on_a_session_model_is_refused(tiny, sessions):
    cfg = stitching.config_for_sessions(sessions, 6, **TINY_MODEL)
    model = LFADS(cfg)
    single = LFADS(config_for_data(tiny, **TINY_MODEL)).make_batch(tiny.train.encod_data[:3])
    with pytest.raises(ValueError, match="built for a model with one session"):
        model.loss_and_grads(single)


# ------------------------------------------------------------------ kernel arguments


def test_matmul_refuses_aliased_output(rng):
    a = rng.standard_normal((6, 6))
    b = rng.standard_normal((6, 6))
    for kwargs, name in ((dict(out=a), "a"), (dict(out=b), "b")):
        with pytest.raises(ValueError, match=f"out overlaps {name} in memory"):
            ops.matmul(a, b, **kwargs)
    big = np.zeros((6, 12))
    ops.matmul(a, b, out=big[:, 6:])  # disjoint column slices of one buffer are fine
    np.testing.assert_allclose(big[:, 6:], a @ b)
    with pytest.raises(ValueError, match="out overlaps a"):
        ops.matmul(big[:, :6], b, out=big[:, 3:9])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
    (dict(beta1=-0.1), r"beta1 must be in \[0, 1\)"),
    (dict(beta2=float("inf")), "beta2 must be a finite number"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=-1e-8), "eps must be > 0"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"),
    (dict(step=0), "step must be an integer >= 1"),
])
def test_adam_refuses_bad_hyperparameters_before_writing(rng, kwargs, match):
    p = rng.standard_normal(10).astype(np.float32)
    g, m, v = (rng.standard_normal(10).astype(np.float32) for _ in range(3))
    v = np.abs(v)
    before = [x.copy() for x in (p, m, v)]
    args = dict(dict(lr=1e-3, step=1), **kwargs)
    with pytest.raises(ValueError, match=match):
        ops.adam_step(p, g, m, v, **args)
    for x, y in zip((p, m, v), before):
        np.testing.assert_array_equal(x, y)


def test_adam_refuses_aliased_vectors(rng):
    p = rng.standard_normal(10).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    with pytest.raises(ValueError, match="params overlaps grads"):
        ops.adam_step(p, p, m, v, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="m overlaps v"):
        ops.adam_step(p, p.copy(), m, m, lr=1e-3, step=1)


def test_gru_forward_refuses_output_over_its_input(rng):
    T, B, H = 3, 2, 4
    xproj = rng.standard_normal((T, B, 3 * H))
    W = rng.standard_normal((3 * H, H))
    h0 = rng.standard_normal((B, H))
    gates = np.empty((T, B, 3 * H))
    with pytest.raises(ValueError, match=r"out\[1\] \(gates\) overlaps xproj"):
        ops.gru_forward(xproj, 0, W, h0, out=(np.empty((T, B, H)), xproj))
    ops.gru_forward(xproj, 0, W, h0, out=(np.empty((T, B, H)), gates))


# ------------------------------------------------------------------ file permissions


def test_checkpoints_and_posteriors_follow_the_umask(data_file, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(["train", data_file, "--out", tmp_path / "o", "--quiet",
                                *CLI_TINY, "--samples", "1"], capsys)
        assert code == 0, err
        for name in ("checkpoints/last.h5", "checkpoints/best.h5", "posterior.h5", "log.csv"):
            assert stat.S_IMODE((tmp_path / "o" / name).stat().st_mode) == 0o644, name
        os.umask(0o027)
        code, _, err = run_cli(["infer", tmp_path / "o" / "checkpoints" / "best.h5", data_file,
                                "--out", tmp_path / "p.h5", "--samples", "1"], capsys)
        assert code == 0, err
        assert stat.S_IMODE((tmp_path / "p.h5").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_memory_check_compares_the_estimate_with_what_is_available(monkeypatch):
    have = resources.available_memory()
    assert have is None or have > 0
    monkeypatch.setattr(resources, "available_memory", lambda: 10 * 2**30)
    resources.check_memory(9 * 2**30, "nine gigabytes")
    with pytest.raises(resources.InsufficientMemoryError,
                       match=r"eleven gigabytes needs about 11.0 GB of memory, but this machine "
                             r"has 10.0 GB available"):
        resources.check_memory(11 * 2**30, "eleven gigabytes")
    monkeypatch.setattr(resources, "available_memory", lambda: None)
    resources.check_memory(2**60, "unknown machine")  # nothing to compare with: no refusal


def test_decoder_and_readout_refuse_outputs_over_their_inputs(rng):
    T, B, N, F = 4, 3, 5, 2
    factors = rng.standard_normal((T * B, F))
    W, b = rng.standard_normal((N, F)), rng.standard_normal(N)
    counts = rng.poisson(1.0, (T * B, N)).astype(np.float64)
    with pytest.raises(ValueError, match="d_factors overlaps factors"):
        ops.poisson_elbo(factors, W, b, counts, T=T, scale=1.0, d_factors=factors)
    G = 3
    inp = {"xgen": rng.standard_normal((T, B, 3 * G)), "W_gen_hh": rng.standard_normal((3 * G, G)),
           "g0": rng.standard_normal((B, G)), "f0": rng.standard_normal((B, F)),
           "W_fac": rng.standard_normal((F, G)), "mask_g": None}
    out = ops.decoder_forward(inp, T, sample=False)
    out["gen_states"] = inp["xgen"][..., :G]
    with pytest.raises(ValueError, match="gen_states overlaps xgen"):
        ops.decoder_forward(inp, T, sample=False, out=out)
