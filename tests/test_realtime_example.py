"""End to end: `lfads-fast train` of a causal model, `lfads-fast export`, the Python binding,
and the C example (examples/stream_counts.c) built with CMake against the installed library:
the C program's outputs equal the binding's, and no heap allocation happens inside a step."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors")
from lfads_fast import cli, realtime, synth  # noqa: E402
from lfads_fast.export import read_export  # noqa: E402
from lfads_fast.train import load_model  # noqa: E402
from test_realtime import assert_decoded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

TINY_CAUSAL = ["--set", "model.ic_enc_dim=8", "--set", "ic_dim=4", "--set", "gen_dim=12",
               "--set", "fac_dim=4", "--set", "co_dim=2", "--set", "ci_enc_dim=6",
               "--set", "con_dim=6", "--set", "ic_enc_seq_len=5", "--set", "ci_enc_causal=true",
               "--set", "train.batch_size=16", "--set", "max_epochs=2", "--set", "lr_init=1e-2"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    sd = synth.chaotic_rnn(n_conditions=8, trials_per_condition=4, train_per_condition=3,
                           n_bins=20, n_neurons=16)
    data = str(synth.save_h5(sd, root / "tiny.h5"))
    assert cli.main(["train", data, "--out", str(root / "run"), "--samples", "0", "--quiet",
                     *TINY_CAUSAL]) == 0
    ckpt = root / "run" / "checkpoints" / "best.h5"
    out = root / "model.safetensors"
    assert cli.main(["export", str(ckpt), "--out", str(out)]) == 0
    return ckpt, out, root


def test_export_command_matches_the_checkpoint(exported, capsys):
    ckpt, out, _ = exported
    model = load_model(ckpt)
    dec = realtime.Decoder(out, mode="streaming")
    assert dec.n_in == 16 and dec.can_stream
    X = np.random.default_rng(0).poisson(1.0, (20, 16)).astype(np.float32)
    res = dec.run(X)
    ref = model.forward(X[None])["output_params"][0, 4:]
    assert np.max(np.abs(res["rates"] - ref) / ref) <= 1e-5


def test_export_command_errors(tmp_path, capsys):
    code = cli.main(["export", str(tmp_path / "none.h5"), "--out", str(tmp_path / "m.safetensors")])
    assert code == 2
    assert "checkpoint" in capsys.readouterr().err


def _build_example(build_dir):
    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler to build examples/")
    if not os.path.exists(cmake):
        pytest.skip("no cmake to build examples/ (the test extra installs it)")
    prefix = realtime.prefix()
    subprocess.run([cmake, "-S", str(EXAMPLES), "-B", str(build_dir), f"-DCMAKE_PREFIX_PATH={prefix}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build_dir)], check=True, capture_output=True)
    return build_dir / "stream_counts"


def _stats(stderr: str) -> dict:
    last = stderr.strip().splitlines()[-1].split()
    return dict(zip(last[::2], last[1::2]))


@pytest.mark.parametrize("mode", ["streaming", "window"])
def test_c_example_equals_python_binding(exported, tmp_path, mode):
    _, model_path, root = exported
    exe = _build_example(root / f"build_{mode}")
    X = np.random.default_rng(1).poisson(1.2, (45, 16)).astype("<f4")
    counts = tmp_path / "counts.f32"
    X.tofile(counts)
    proc = subprocess.run([str(exe), str(model_path), str(counts), "--mode", mode, "--repeat", "3",
                           "--bad-every", "7", "--quiet"], check=True, capture_output=True, text=True)
    stats = _stats(proc.stderr)
    # NaN bins refused (20 of them) without a heap allocation, the outputs as without them.
    assert stats["refused"] == "20" and stats["allocs_in_step"] == "0", proc.stderr
    proc = subprocess.run([str(exe), str(model_path), str(counts), "--mode", mode, "--repeat", "3",
                           "--bad-every", "7"], check=True, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    dec = realtime.Decoder(model_path, mode=mode)
    res = dec.run(np.concatenate([X] * 3))
    assert len(lines) == len(res["bin"])
    for line, b, r, f in zip(lines, res["bin"], res["rates"], res["factors"]):
        head, fac, _ = line.split("|")
        fields = head.split()
        assert int(fields[0]) == b
        # The same library, the same float32 operations: identical up to printing (%.9g).
        np.testing.assert_array_equal(np.array(fields[1:], np.float32), r)
        np.testing.assert_array_equal(np.array(fac.split(), np.float32), f)
    assert "refused: NaN or infinite count: counts[0] is NaN" in proc.stderr
    stats = _stats(proc.stderr)
    assert stats["allocs_in_step"] == "0", proc.stderr
    assert int(stats["bins"]) == 135


def behaviour_file(model_path, path, rng):
    """A data file whose behaviour is made from the decoder's own rates 2 bins earlier (plus
    noise): train trials 0-19, valid 20-23. Returns the counts [24, T, N]."""
    import h5py

    dec = realtime.Decoder(model_path, mode="streaming")
    B, T, N = 24, 20, 16
    enc = rng.poisson(1.0, (B, T, N)).astype(np.float32)
    A = rng.standard_normal((2, N))
    beh = np.zeros((B, T, 2))
    for i in range(B):
        dec.reset()
        res = dec.run(enc[i])
        rates = np.zeros((T, N))
        rates[res["bin"]] = res["rates"]
        beh[i, 2:] = rates[:-2] @ A.T + 0.01 * rng.standard_normal((T - 2, 2))
        beh[i, :6] = np.nan  # no features before the IC bins: left out
    with h5py.File(path, "w") as f:
        for split, sl in (("train", slice(0, 20)), ("valid", slice(20, 24))):
            f[f"{split}_encod_data"] = enc[sl]
            f[f"{split}_recon_data"] = enc[sl]
            f[f"{split}_behavior"] = beh[sl]
    return enc


def test_fit_decoder_recovers_a_lagged_readout(exported, tmp_path, capsys):
    """fit-decoder picks lag 2 by cross-validation, and the real-time step returns the fitted
    read-out."""
    _, model_path, _ = exported
    path = tmp_path / "beh.h5"
    enc = behaviour_file(model_path, path, np.random.default_rng(3))
    out = tmp_path / "with_decoder.safetensors"
    code = cli.main(["fit-decoder", str(model_path), str(path), "--out", str(out), "--lags", "0,1,2,3",
                     "--folds", "4"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "lag 2 bins" in stdout
    r2 = float(stdout.split("R^2 ")[1].split()[0])
    assert r2 > 0.95
    d = realtime.Decoder(out, mode="streaming")
    assert d.n_decoded == 2
    res = d.run(enc[20])
    _, meta = read_export(out)
    assert_decoded(res["decoded"], res["rates"], meta["W"], meta["b"], lag=2)
    assert meta["lag"] == 2 and meta["mode"] == "streaming" and meta["method"] == "ridge" and "alpha" in meta
    # Bad requests name what is wrong.
    code = cli.main(["fit-decoder", str(model_path), str(path), "--out", str(out), "--behavior", "hand"])
    assert code == 2 and "no train_hand array" in capsys.readouterr().err


def test_fit_decoder_ole(exported, tmp_path, capsys):
    """--method ole: the OLE read-out, its method and lambda in the file, applied by the step."""
    _, model_path, _ = exported
    path = tmp_path / "beh.h5"
    enc = behaviour_file(model_path, path, np.random.default_rng(5))
    out = tmp_path / "ole.safetensors"
    code = cli.main(["fit-decoder", str(model_path), str(path), "--out", str(out), "--lags", "0,2",
                     "--method", "ole", "--alphas", "1e-4,1e-2,1", "--folds", "4"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "ole from rates" in stdout and "lag 2 bins, lambda " in stdout
    _, meta = read_export(out)
    assert meta["method"] == "ole" and meta["lambda"] in (1e-4, 1e-2, 1.0) and "alpha" not in meta
    assert meta["cv_r2"] > 0.9
    res = realtime.Decoder(out, mode="streaming").run(enc[21])
    assert_decoded(res["decoded"], res["rates"], meta["W"], meta["b"], lag=2)
    # Bad requests name the argument.
    args = ["fit-decoder", str(model_path), str(path), "--out", str(tmp_path / "bad.safetensors")]
    with pytest.raises(SystemExit):
        cli.main([*args, "--method", "foo"])
    assert "--method: invalid choice: 'foo'" in capsys.readouterr().err
    assert cli.main([*args, "--method", "ole", "--alphas", "1e-2,big"]) == 2
    assert "--alphas must be comma-separated numbers, got '1e-2,big'" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_pkg_config_build(exported, tmp_path):
    """The installed pkg-config file is enough to compile and link the example."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or shutil.which("pkg-config") is None:
        pytest.skip("no C compiler or pkg-config")
    _, model_path, _ = exported
    env = dict(os.environ, PKG_CONFIG_PATH=str(realtime.prefix() / "lib" / "pkgconfig"))
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "lfads_fast_realtime"], env=env,
                           check=True, capture_output=True, text=True).stdout.split()
    exe = tmp_path / "stream_counts"
    subprocess.run([cc, str(EXAMPLES / "stream_counts.c"), *flags, "-o", str(exe)], check=True,
                   capture_output=True)
    X = np.random.default_rng(4).poisson(1.0, (30, 16)).astype("<f4")
    X.tofile(tmp_path / "c.f32")
    out = subprocess.run([str(exe), str(model_path), str(tmp_path / "c.f32"), "--mode", "streaming"],
                         check=True, capture_output=True, text=True).stdout.splitlines()
    rates = np.array([line.split("|")[0].split()[1:] for line in out], np.float32)
    np.testing.assert_array_equal(rates, realtime.Decoder(model_path, mode="streaming").run(X)["rates"])
