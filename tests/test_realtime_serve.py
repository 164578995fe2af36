"""lfads-fast serve against a real redis-server on loopback: outputs equal offline inference
over many bins, in order, with timestamps; malformed entries are answered with an error entry
and the stream goes on; SIGINT stops the node cleanly.

The redis-server is Debian's: when it is missing and the tests run as root with apt-get, the
fixture installs it (as CI does); otherwise these tests skip and say why."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

redis = pytest.importorskip("redis")
pytest.importorskip("safetensors")
from lfads_fast import LFADSConfig  # noqa: E402
from lfads_fast.export import export_model  # noqa: E402
from lfads_fast.model import LFADS  # noqa: E402
from lfads_fast.realtime import Decoder  # noqa: E402
from local_redis import free_port, start_server  # noqa: E402


def _redis_server_binary():
    exe = shutil.which("redis-server")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], env=env, capture_output=True)
        exe = shutil.which("redis-server")
        if exe is None:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], env=env, capture_output=True)
            exe = shutil.which("redis-server")
    return exe


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory):
    exe = _redis_server_binary()
    if exe is None:
        pytest.skip("redis-server is not installed and cannot be installed here (needs root and "
                    "apt-get): apt-get install redis-server")
    port = free_port()
    try:
        proc = start_server(exe, port, tmp_path_factory.mktemp("redis"))
    except RuntimeError as e:
        pytest.fail(str(e))
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory):
    cfg = LFADSConfig(encod_data_dim=12, encod_seq_len=40, ic_enc_dim=8, ci_enc_dim=6, con_dim=7, co_dim=3,
                      ic_dim=5, gen_dim=10, fac_dim=4, ci_lag=2, ic_enc_seq_len=5, ci_enc_causal=True)
    model = LFADS(cfg, seed=3)
    model.flat += (np.random.default_rng(0).standard_normal(model.flat.size) * 0.1).astype(np.float32)
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    export_model(model, path)
    return model, path


def _start_serve(model_path, port, *extra):
    cmd = [sys.executable, "-c", "import sys; from lfads_fast.cli import main; sys.exit(main(sys.argv[1:]))",
           "serve", str(model_path), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready:"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _read_all(client, stream, n, timeout=60.0):
    out, last, t_end = [], "0", time.time() + timeout
    while len(out) < n and time.time() < t_end:
        got = client.xread({stream: last}, block=200)
        for _, entries in got or []:
            for eid, fields in entries:
                out.append(fields)
                last = eid
    return out


def test_serve_matches_offline_inference(redis_port, causal_model):
    model, path = causal_model
    client = redis.Redis(port=redis_port)
    client.delete("spikes", "lfads")
    proc = _start_serve(path, redis_port, "--in-stream", "spikes", "--out-stream", "lfads")
    rng = np.random.default_rng(1)
    T, N = 40, 12
    trials = [rng.poisson(1.0, (T, N)).astype("<f4") for _ in range(5)]
    sent = []  # (id, kind)
    nan_bin = trials[0][0].copy()
    nan_bin[2] = np.nan
    for i, X in enumerate(trials):
        sent.append((client.xadd("spikes", {"reset": 1}), "reset"))
        for t, x in enumerate(X):
            if t == 10 and i == 1:  # malformed entries in the middle of a trial
                sent.append((client.xadd("spikes", {"counts": x.tobytes()[:-4]}), "error"))
                sent.append((client.xadd("spikes", {"other": b"1"}), "error"))
                sent.append((client.xadd("spikes", {"counts": nan_bin.tobytes()}), "error"))
                sent.append((client.xadd("spikes", {"counts": b"not floats"}), "error"))
            sent.append((client.xadd("spikes", {"counts": x.tobytes()}), "bin"))
    outs = _read_all(client, "lfads", len(sent))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "stopped: 200 bins, 180 outputs, 4 refused entries, 5 resets" in stdout
    assert len(outs) == len(sent)
    # One output per input, in order.
    assert [o[b"in_id"] for o in outs] == list(eid for eid, _ in sent)
    errors = [o for o, (_, kind) in zip(outs, sent) if kind == "error"]
    assert [e[b"error"] for e in errors] == [b"channels", b"format", b"nan", b"channels"]
    assert b"44 bytes, expected 48" in errors[0][b"message"]
    assert b"counts[2] is NaN" in errors[2][b"message"]
    bins = [o for o, (_, kind) in zip(outs, sent) if kind == "bin"]
    K = model.config.ic_enc_seq_len
    for i, X in enumerate(trials):
        mine = bins[i * T : (i + 1) * T]
        assert [int(o[b"bin"]) for o in mine] == [-1] * (K - 1) + list(range(K - 1, T))
        rates = np.array([np.frombuffer(o[b"rates"], "<f4") for o in mine[K - 1 :]])
        ref = model.forward(X[None])["output_params"][0, K - 1 :]
        assert np.max(np.abs(rates - ref) / ref) <= 1e-5
        np.testing.assert_array_equal(rates, Decoder(path, mode="streaming").run(X)["rates"])
        for o in mine:
            assert int(o[b"t_receive"]) <= int(o[b"t_before"]) <= int(o[b"t_after"])


def test_serve_options_from_a_file_and_bad_ones(redis_port, causal_model, tmp_path):
    _, path = causal_model
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("in_stream: a\nout_stream: b\nmode: window\nwindow: 8\n")
    client = redis.Redis(port=redis_port)
    client.delete("a", "b")
    proc = _start_serve(path, redis_port, "--config", str(cfg))
    X = np.random.default_rng(2).poisson(1.0, (20, 12)).astype("<f4")
    for x in X:
        client.xadd("a", {"counts": x.tobytes()})
    outs = _read_all(client, "b", 20)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert [int(o[b"bin"]) for o in outs] == [-1] * 7 + list(range(7, 20))
    ref = Decoder(path, mode="window", window=8).run(X)["rates"]
    np.testing.assert_array_equal(np.array([np.frombuffer(o[b"rates"], "<f4") for o in outs[7:]]), ref)
    cfg.write_text("in_steam: a\n")
    p = subprocess.run([sys.executable, "-c", "import sys; from lfads_fast.cli import main; sys.exit(main(sys.argv[1:]))",
                        "serve", str(path), "--config", str(cfg), "--port", str(redis_port)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown serve options in_steam" in p.stderr
    p = subprocess.run([sys.executable, "-c", "import sys; from lfads_fast.cli import main; sys.exit(main(sys.argv[1:]))",
                        "serve", str(path), "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Redis at 127.0.0.1" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one line, no traceback
    cfg.write_text("in_stream: [a\n")
    p = subprocess.run([sys.executable, "-c", "import sys; from lfads_fast.cli import main; sys.exit(main(sys.argv[1:]))",
                        "serve", str(path), "--config", str(cfg), "--port", str(redis_port)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not valid YAML" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
