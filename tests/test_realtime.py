"""Real-time inference (liblfads_fast_realtime through lfads_fast.realtime.Decoder): parity of
window mode with the offline forward, of streaming mode with the causal model's own offline
forward, and bad input (counts and model files) with clear errors and a stream that goes on."""
import json
import struct

import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

from lfads_fast import LFADSConfig  # noqa: E402
from lfads_fast.export import FORMAT_VERSION, export_model, read_export  # noqa: E402
from lfads_fast.model import LFADS  # noqa: E402
from lfads_fast.realtime import Decoder, RealtimeError  # noqa: E402

# float32 batch-1 products summed in another order than the offline BLAS GEMMs: a few ulp per
# product, through W steps of the recurrences; the required bound.
WINDOW_RTOL = 1e-5
STREAM_RTOL = 1e-5
# The step's decoded output, a float32 dot product of F terms, against the same map in float64:
# at most F roundings (6e-8 each) of the sum of the terms' magnitudes; F <= 16 here.
DECODED_RTOL = 1e-6



def assert_decoded(decoded, rates, W, b, lag):
    """The step's decoded outputs [T, D] are the stored map applied to the rates lag bins
    before (float64 reference, DECODED_RTOL of the terms' magnitudes); NaN until lag is filled."""
    rates = np.asarray(rates[: len(rates) - lag], np.float64)
    W, b = np.asarray(W, np.float64), np.asarray(b, np.float64)
    bound = DECODED_RTOL * (np.abs(rates) @ np.abs(W).T + np.abs(b))
    assert np.all(np.isnan(decoded[:lag]))
    assert np.all(np.abs(decoded[lag:] - (rates @ W.T + b)) <= bound)


SMALL = dict(encod_data_dim=12, encod_seq_len=20, ic_enc_dim=8, ci_enc_dim=6, con_dim=7, co_dim=3,
             ic_dim=5, gen_dim=10, fac_dim=4, ci_lag=2)
NO_CON = dict(co_dim=0, con_dim=0, ci_enc_dim=0)


def make_model(rng, **overrides):
    cfg = LFADSConfig(**{**SMALL, **overrides})
    model = LFADS(cfg, seed=int(rng.integers(1 << 30)))
    # Away from the initialisation (zero h0, unit biases) so every parameter matters.
    model.flat += (rng.standard_normal(model.flat.size) * 0.1).astype(np.float32)
    return model


def export(model, tmp_path, name="m.safetensors", **kw):
    path = tmp_path / name
    export_model(model, path, **kw)
    return path


def counts(rng, T, N, rate=1.0):
    return rng.poisson(rate, (T, N)).astype(np.float32)


def max_rel(a, b):
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.parametrize("overrides, lookahead", [
    ({}, 0), ({}, 3), (dict(ci_lag=0), 0), (NO_CON, 2), (dict(ic_enc_seq_len=4), 0),
    (dict(ic_enc_seq_len=4, ci_enc_causal=True), 1), (dict(recon_data_dim=15), 0),
])
def test_window_matches_offline_forward(rng, tmp_path, overrides, lookahead):
    model = make_model(rng, **overrides)
    dec = Decoder(export(model, tmp_path), mode="window", lookahead=lookahead)
    T, W = 34, model.config.encod_seq_len
    X = counts(rng, T, model.config.encod_data_dim)
    res = dec.run(X)
    np.testing.assert_array_equal(res["bin"], np.arange(W - 1, T) - lookahead)
    windows = np.stack([X[t - W + 1 : t + 1] for t in range(W - 1, T)])
    ref = model.forward(windows)
    pos = W - 1 - lookahead
    assert max_rel(res["rates"], ref["output_params"][:, pos]) <= WINDOW_RTOL
    np.testing.assert_allclose(res["factors"], ref["factors"][:, pos], rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(ic_enc_seq_len=5, ci_enc_causal=True),
    dict(ic_enc_seq_len=5, ci_enc_causal=True, ci_lag=0),
    dict(ic_enc_seq_len=3, ci_enc_causal=True, ci_lag=4),
    dict(ic_enc_seq_len=1, ci_enc_causal=True),
    dict(NO_CON, ic_enc_seq_len=6),
])
def test_streaming_matches_causal_offline_forward(rng, tmp_path, overrides):
    model = make_model(rng, **overrides)
    K, T = model.config.ic_enc_seq_len, model.config.encod_seq_len
    dec = Decoder(export(model, tmp_path), mode="streaming")
    assert dec.can_stream
    X = counts(rng, T, model.config.encod_data_dim)
    res = dec.run(X)
    np.testing.assert_array_equal(res["bin"], np.arange(K - 1, T))
    ref = model.forward(X[None])
    assert max_rel(res["rates"], ref["output_params"][0, K - 1 :]) <= STREAM_RTOL
    # Bins after the trained length go on (the generator runs freely), and reset starts over.
    more = dec.run(counts(rng, 50, model.config.encod_data_dim))
    assert np.all(np.isfinite(more["rates"])) and more["bin"][-1] == T + 49
    dec.reset()
    again = dec.run(X)
    np.testing.assert_array_equal(again["rates"], res["rates"])


def test_streaming_refuses_bidirectional_models(rng, tmp_path):
    path = export(make_model(rng, ic_enc_seq_len=5), tmp_path)
    with pytest.raises(RealtimeError, match="ci_enc_causal") as e:
        Decoder(path, mode="streaming")
    assert e.value.code == "argument"
    path = export(make_model(rng, ci_enc_causal=True), tmp_path)
    with pytest.raises(RealtimeError, match="ic_enc_seq_len"):
        Decoder(path, mode="streaming")
    assert Decoder(path, mode=None).mode == "window"  # None: the mode the model allows


def test_mode_none_streams_a_causal_model(rng, tmp_path):
    path = export(make_model(rng, ic_enc_seq_len=5, ci_enc_causal=True), tmp_path)
    assert Decoder(path, mode=None).mode == "streaming"
    with pytest.raises(ValueError, match="window and lookahead belong to window mode"):
        Decoder(path, mode=None, lookahead=2)


@pytest.mark.parametrize("mode", ["window", "streaming"])
def test_bad_bins_are_refused_and_the_stream_goes_on(rng, tmp_path, mode):
    model = make_model(rng, ic_enc_seq_len=5, ci_enc_causal=True)
    path = export(model, tmp_path)
    N = model.config.encod_data_dim
    X = counts(rng, 30, N)
    clean = Decoder(path, mode=mode).run(X)
    dec = Decoder(path, mode=mode, max_count=50)
    nan = X[0].copy()
    nan[3] = np.nan
    inf = X[0].copy()
    inf[0] = np.inf
    neg = X[0].copy()
    neg[7] = -1
    huge = X[0].copy()
    huge[2] = 1e6
    bad = [(np.zeros(N + 1, np.float32), "channels", "13 channels, the model expects 12"),
           (np.zeros(N - 1, np.float32), "channels", "11 channels"),
           (nan, "nan", r"counts\[3\] is NaN"), (inf, "nan", r"counts\[0\] is infinite"),
           (neg, "negative", r"counts\[7\] is negative"), (huge, "huge", r"counts\[2\] = 1e\+06 is above max_count 50"),
           (np.zeros((2, N), np.float32), "channels", "one bin")]
    outs = []
    for t, x in enumerate(X):
        if t in (0, 6, 17):  # bad bins before the first, in the middle and late
            for b, code, msg in bad:
                with pytest.raises(RealtimeError, match=msg) as e:
                    dec.step(b)
                assert e.value.code == code
        o = dec.step(x)
        if o is not None:
            outs.append(o.rates)
    np.testing.assert_array_equal(np.array(outs), clean["rates"])


def test_read_export_round_trip(rng, tmp_path):
    model = make_model(rng, ic_enc_seq_len=3, ci_enc_causal=True)
    W = rng.standard_normal((2, model.config.fac_dim))
    path = export(model, tmp_path, decoder={"W": W, "b": [0.5, -1.0], "features": "factors", "lag": 2,
                                            "alpha": 0.1})
    back, dec = read_export(path)
    assert back.config == model.config
    np.testing.assert_array_equal(back.flat, model.flat)
    assert dec["lag"] == 2 and dec["alpha"] == 0.1 and dec["n_outputs"] == 2
    np.testing.assert_array_equal(dec["W"], W.astype(np.float32))
    assert json.loads(Decoder(path).config_json) == model.config.to_dict()


@pytest.mark.parametrize("mode", ["window", "streaming"])
def test_decoded_outputs_are_the_lagged_linear_readout(rng, tmp_path, mode):
    model = make_model(rng, ic_enc_seq_len=4, ci_enc_causal=True)
    W = rng.standard_normal((3, model.config.recon_data_dim)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    path = export(model, tmp_path, decoder={"W": W, "b": b, "features": "rates", "lag": 2})
    res = Decoder(path, mode=mode).run(counts(rng, 30, model.config.encod_data_dim))
    assert_decoded(res["decoded"], res["rates"], W, b, lag=2)


def test_ole_decoder_output_is_its_map_applied_in_numpy(rng, tmp_path):
    """A decoder fitted by the OLE (lfads_fast.readout.fit_ole) on the step's own rates is
    stored with its method and lambda, and the step returns W f + c of the stored map."""
    from lfads_fast.readout import fit_ole

    model = make_model(rng, ic_enc_seq_len=4, ci_enc_causal=True)
    plain = Decoder(export(model, tmp_path, "plain.safetensors"), mode="streaming")
    N, lag = model.config.encod_data_dim, 1
    A = rng.standard_normal((2, model.config.recon_data_dim))
    feats, behs = [], []
    for _ in range(8):
        plain.reset()
        rates = plain.run(counts(rng, 25, N))["rates"]
        beh = np.full((len(rates), 2), np.nan)
        beh[lag:] = rates[:-lag] @ A.T + 0.01 * rng.standard_normal((len(rates) - lag, 2))
        feats.append(rates)
        behs.append(beh)
    fit = fit_ole(feats, behs, lags=[lag], folds=4)
    path = export(model, tmp_path, decoder={"W": fit.W, "b": fit.b, "features": "rates", "lag": lag,
                                            "method": fit.method, "lambda": fit.alpha})
    _, meta = read_export(path)
    assert meta["method"] == "ole" and meta["lambda"] == fit.alpha
    res = Decoder(path, mode="streaming").run(counts(rng, 30, N))
    assert_decoded(res["decoded"], res["rates"], meta["W"], meta["b"], lag)


# ---------------------------------------------------------------------------- model files

def test_missing_file(tmp_path):
    with pytest.raises(RealtimeError, match="cannot open") as e:
        Decoder(tmp_path / "nope.safetensors")
    assert e.value.code == "io"


def test_truncated_file(rng, tmp_path):
    path = export(make_model(rng), tmp_path)
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(RealtimeError, match="truncated|too short|not a safetensors") as e:
            Decoder(p)
        assert e.value.code == "format"


@pytest.mark.parametrize("payload", [b"", b"\x00" * 64, b"PK\x03\x04 not a model at all" * 20,
                                     struct.pack("<Q", 12) + b"{not json!!}", struct.pack("<Q", 2) + b"[]"])
def test_foreign_bytes(tmp_path, payload):
    p = tmp_path / "foreign.bin"
    p.write_bytes(payload)
    with pytest.raises(RealtimeError) as e:
        Decoder(p)
    assert e.value.code == "format"
    assert str(p) in str(e.value)


def test_foreign_safetensors(tmp_path):
    p = tmp_path / "other.safetensors"
    save_file({"weight": np.zeros((3, 3), np.float32)}, p, metadata={"format": "pt"})
    with pytest.raises(RealtimeError, match="not an lfads_fast real-time model .*'pt'") as e:
        Decoder(p)
    assert e.value.code == "format"


def test_newer_format_version(rng, tmp_path):
    model = make_model(rng)
    tensors = {k: np.ascontiguousarray(v) for k, v in model.params.items()}
    p = tmp_path / "future.safetensors"
    save_file(tensors, p, metadata={"format": "lfads_fast.realtime",
                                    "format_version": str(FORMAT_VERSION + 1),
                                    "config": model.config.to_json()})
    with pytest.raises(RealtimeError, match="newer than this library reads") as e:
        Decoder(p)
    assert e.value.code == "version"
    with pytest.raises(ValueError, match="newer than this lfads_fast reads"):
        read_export(p)


def test_wrong_tensor_shape_and_dtype(rng, tmp_path):
    model = make_model(rng)
    meta = {"format": "lfads_fast.realtime", "format_version": "1", "config": model.config.to_json()}
    tensors = {k: np.ascontiguousarray(v) for k, v in model.params.items()}
    tensors["gen_W_hh"] = np.zeros((3, 3), np.float32)
    p = tmp_path / "shape.safetensors"
    save_file(tensors, p, metadata=meta)
    with pytest.raises(RealtimeError, match=r"gen_W_hh' has shape \[3, 3\], the config needs \[30, 10\]"):
        Decoder(p)
    tensors["gen_W_hh"] = np.zeros((30, 10), np.float64)
    save_file(tensors, p, metadata=meta)
    with pytest.raises(RealtimeError, match="dtype F64 .expected F32"):
        Decoder(p)
    del tensors["gen_W_hh"]
    save_file(tensors, p, metadata=meta)
    with pytest.raises(RealtimeError, match="'gen_W_hh' is missing"):
        Decoder(p)


@pytest.mark.parametrize("metadata, message", [
    (dict(format_version="one"), "metadata format_version is missing or not a positive integer"),
    (dict(config="{not json"), "metadata config is missing or not a JSON object"),
    (dict(decoder="[1, 2]"), "metadata decoder is not a JSON object"),
    (dict(decoder='{"features": "spikes", "lag": 0, "n_outputs": 2}'),
     "metadata decoder.features must be 'rates' or 'factors'"),
    (dict(decoder='{"features": "rates", "lag": -1, "n_outputs": 2}'), "lag is not an integer >= 0"),
    (dict(decoder='{"features": "rates", "lag": 0, "n_outputs": 3}'),
     r"'decoder_W' has shape \[2, 12\], the config needs \[3, 12\]"),
    (dict(decoder='{"features": "factors", "lag": 0, "n_outputs": 2}'),
     r"'decoder_W' has shape \[2, 12\], the config needs \[2, 4\]"),
])
def test_malformed_metadata(rng, tmp_path, metadata, message):
    """Metadata that export never writes (a damaged or hand-made file) is refused by name."""
    model = make_model(rng)
    tensors = {k: np.ascontiguousarray(v) for k, v in model.params.items()}
    tensors["decoder_W"] = rng.standard_normal((2, 12)).astype(np.float32)
    tensors["decoder_b"] = np.zeros(2, np.float32)
    p = tmp_path / "meta.safetensors"
    save_file(tensors, p, metadata={"format": "lfads_fast.realtime", "format_version": "1",
                                    "config": model.config.to_json(), **metadata})
    with pytest.raises(RealtimeError, match=message) as e:
        Decoder(p)
    assert e.value.code == "format"


def test_bad_options(rng, tmp_path):
    path = export(make_model(rng), tmp_path)
    with pytest.raises(RealtimeError, match="lookahead must be in 0 .. window - 1 = 19"):
        Decoder(path, lookahead=20)
    with pytest.raises(RealtimeError, match="window must be in"):
        Decoder(path, window=-3)
    with pytest.raises(ValueError, match="mode must be"):
        Decoder(path, mode="fast")


def test_export_refuses_what_real_time_cannot_run(rng, tmp_path):
    with pytest.raises(ValueError, match="external inputs"):
        export(make_model(rng, ext_input_dim=2), tmp_path)


def test_window_shorter_than_the_trial(rng, tmp_path):
    """A window of W bins is the offline forward of the same parameters over W-bin trials."""
    model = make_model(rng)
    dec = Decoder(export(model, tmp_path), mode="window", window=8, lookahead=2)
    X = counts(rng, 25, model.config.encod_data_dim)
    res = dec.run(X)
    short = LFADS(LFADSConfig(**{**model.config.to_dict(), "encod_seq_len": 8, "recon_seq_len": 8}))
    short.flat[...] = model.flat
    ref = short.forward(np.stack([X[t - 7 : t + 1] for t in range(7, 25)]))["output_params"][:, 5]
    np.testing.assert_array_equal(res["bin"], np.arange(5, 23))
    assert max_rel(res["rates"], ref) <= WINDOW_RTOL
