"""lfads-torch migration: its Hydra YAMLs into LFADSConfig/TrainConfig, its Lightning
checkpoints into lfads_fast models (forward parity with tests/torch_reference.py), and the
errors that name what does not fit."""
import h5py
import numpy as np
import pytest
import yaml

from lfads_fast import data, lfads_torch
from lfads_fast.config import LFADSConfig
from lfads_fast.train import TrainConfig

torch = pytest.importorskip("torch", reason="torch (test extra) writes the checkpoints")
import torch_reference as ref  # noqa: E402

# float64 model against the float64 reference: the same math, only summation order differs.
PARITY_TOL_F64 = 1e-10
# The imported model is float32; rates are O(1).
PARITY_TOL_F32 = 2e-5

MODEL_YAML = """
_target_: lfads_torch.model.LFADS
encod_data_dim: 20
encod_seq_len: 30
recon_seq_len: 35
ext_input_dim: 0
ic_enc_seq_len: 0
ic_enc_dim: 16
ci_enc_dim: 8
ci_lag: 1
con_dim: 8
co_dim: 2
ic_dim: 12
gen_dim: 24
fac_dim: 6
readin:
  - _target_: torch.nn.Identity
readout:
  _target_: torch.nn.ModuleList
  modules:
    - _target_: lfads_torch.modules.readin_readout.FanInLinear
      in_features: ${model.fac_dim}
      out_features: 26
train_aug_stack:
  _target_: lfads_torch.modules.augmentations.AugmentationStack
  transforms:
    - _target_: lfads_torch.modules.augmentations.CoordinatedDropout
      cd_rate: 0.25
      cd_pass_rate: 0.0
      ic_enc_seq_len: ${model.ic_enc_seq_len}
  batch_order: [0]
  loss_order: [0]
infer_aug_stack:
  _target_: lfads_torch.modules.augmentations.AugmentationStack
reconstruction:
  - _target_: lfads_torch.modules.recons.Poisson
variational: True
co_prior:
  _target_: lfads_torch.modules.priors.AutoregressiveMultivariateNormal
  tau: 8.0
  nvar: 0.2
  shape: ${model.co_dim}
ic_prior:
  _target_: lfads_torch.modules.priors.MultivariateNormal
  mean: 0
  variance: 0.05
  shape: ${model.ic_dim}
ic_post_var_min: 1.0e-4
dropout_rate: 0.02
cell_clip: 5.0
loss_scale: 1.0e+4
recon_reduce_mean: True
lr_init: 4.0e-3
lr_stop: 1e-5
lr_decay: 0.95
lr_patience: 6
lr_adam_beta1: 0.9
lr_adam_beta2: 0.999
lr_adam_epsilon: 1.0e-8
lr_scheduler: False
weight_decay: 0.0
l2_start_epoch: 0
l2_increase_epoch: 80
l2_ic_enc_scale: 0.0
l2_ci_enc_scale: 0.0
l2_gen_scale: 1.0e-4
l2_con_scale: 0.0
kl_start_epoch: 0
kl_increase_epoch: 80
kl_ic_scale: 1.0e-6
kl_co_scale: 1.0e-5
"""
DATAMODULE_YAML = """
_target_: lfads_torch.datamodules.BasicDataModule
data_path: /somewhere/data.h5
batch_size: 64
num_workers: 4
"""
TRAINER_YAML = """
_target_: pytorch_lightning.Trainer
max_epochs: 900
gradient_clip_val: 200
log_every_n_steps: 5
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_config_maps_every_key(tmp_path):
    m, t, notes = lfads_torch.read_config(_write(tmp_path, "m.yaml", MODEL_YAML),
                                          _write(tmp_path, "d.yaml", DATAMODULE_YAML),
                                          _write(tmp_path, "t.yaml", TRAINER_YAML))
    cfg, tcfg = LFADSConfig.from_dict(m), TrainConfig.from_dict(t)
    assert (cfg.encod_data_dim, cfg.recon_data_dim, cfg.recon_seq_len) == (20, 26, 35)
    assert (cfg.cd_rate, cfg.co_prior_tau, cfg.co_prior_nvar, cfg.ic_prior_var) == (0.25, 8.0, 0.2, 0.05)
    assert (cfg.l2_gen_scale, cfg.kl_co_scale, cfg.dropout_rate) == (1e-4, 1e-5, 0.02)
    assert tcfg.lr_stop == 1e-5 and tcfg.lr_scheduler is False
    assert (tcfg.batch_size, tcfg.max_epochs, tcfg.max_grad_norm) == (64, 900, 200.0)
    assert any("datamodule.num_workers" in n for n in notes)
    assert any("trainer.log_every_n_steps" in n for n in notes)


# A TemporalShift appended to MODEL_YAML's training stack (transforms[1]).
_SHIFT = ("    - _target_: lfads_torch.modules.augmentations.TemporalShift\n"
          "      std: 2.5\n      max_shift: 4\n")


def test_read_config_maps_cd_pass_rate(tmp_path):
    text = MODEL_YAML.replace("cd_pass_rate: 0.0", "cd_pass_rate: 0.2")
    m, t, _ = lfads_torch.read_config(_write(tmp_path, "m.yaml", text))
    cfg = LFADSConfig.from_dict(m)
    assert (cfg.cd_rate, cfg.cd_pass_rate) == (0.25, 0.2)
    assert "cd_pass_rate" not in t


@pytest.mark.parametrize("order, shifted", [("[1, 0]", True), ("[0]", False)])
def test_read_config_maps_temporal_shift(tmp_path, order, shifted):
    """Shifting before coordinated dropout maps to the train section; a transform left out
    of batch_order does nothing in lfads-torch and is only noted."""
    text = MODEL_YAML.replace("  batch_order: [0]", _SHIFT + f"  batch_order: {order}")
    m, t, notes = lfads_torch.read_config(_write(tmp_path, "m.yaml", text))
    tcfg = TrainConfig.from_dict(t)
    if shifted:
        assert (tcfg.temporal_shift_std, tcfg.temporal_shift_max) == (2.5, 4)
    else:
        assert tcfg.temporal_shift_std == 0.0
        assert any("transforms[1]: ignored (TemporalShift is not in batch_order" in n for n in notes)
    assert m["cd_rate"] == 0.25


def test_read_config_coordinated_dropout_not_in_batch_order(tmp_path):
    """lfads-torch applies no transform that batch_order leaves out: coordinated dropout too."""
    text = MODEL_YAML.replace("  batch_order: [0]", _SHIFT + "  batch_order: [1]")
    m, t, notes = lfads_torch.read_config(_write(tmp_path, "m.yaml", text))
    assert "cd_rate" not in m and "cd_pass_rate" not in m
    assert LFADSConfig.from_dict(m).cd_rate == 0.0
    assert any("transforms[0]: ignored (CoordinatedDropout is not in batch_order" in n for n in notes)
    assert t["temporal_shift_std"] == 2.5


def test_read_config_temporal_shift_defaults(tmp_path):
    """Without std and max_shift, lfads-torch's constructor defaults (3.0, 6) apply."""
    shift = "    - _target_: lfads_torch.modules.augmentations.TemporalShift\n"
    text = MODEL_YAML.replace("  batch_order: [0]", shift + "  batch_order: [1, 0]")
    _, t, _ = lfads_torch.read_config(_write(tmp_path, "m.yaml", text))
    assert (t["temporal_shift_std"], t["temporal_shift_max"]) == (3.0, 6)


def test_read_config_composed_file(tmp_path):
    composed = {"model": yaml.safe_load(MODEL_YAML), "datamodule": yaml.safe_load(DATAMODULE_YAML)}
    m, t, _ = lfads_torch.read_config(composed)
    assert m["fac_dim"] == 6 and t["batch_size"] == 64


@pytest.mark.parametrize("edit, key", [
    (("lr_init: 4.0e-3", "lr_intit: 4.0e-3"), "model.lr_intit: not an lfads-torch model option "
                                             "(did you mean lr_init"),
    (("cd_pass_rate: 0.0", "cd_pass_rate: 0.2\n      cd_extra: 1"),
     "model.train_aug_stack.transforms[0].cd_extra: no counterpart"),
    (("ic_enc_seq_len: 0\n", "ic_enc_seq_len: 5\n"), "model.ic_enc_seq_len: only 0"),
    (("variational: True", "variational: False"), "model.variational"),
    (("- _target_: lfads_torch.modules.recons.Poisson", "- _target_: lfads_torch.modules.recons.Gamma"),
     "model.reconstruction: one Poisson"),
    (("  batch_order: [0]", _SHIFT + "  batch_order: [0, 1]"),
     "model.train_aug_stack.transforms[1]: lfads_fast shifts the data before coordinated dropout"),
    (("  batch_order: [0]", "    - _target_: lfads_torch.modules.augmentations.SpikeJitter\n"
                            "  batch_order: [0, 1]"),
     "model.train_aug_stack.transforms[1]: the augmentation SpikeJitter has no counterpart"),
    (("  batch_order: [0]", "  batch_order: [0, 3]"), "model.train_aug_stack.batch_order must list"),
    (("- _target_: torch.nn.Identity", "- _target_: torch.nn.Linear"), "model.readin"),
    (("shape: ${model.co_dim}", "shape: ${model.nope}"), "model.co_prior.shape: cannot resolve"),
])
def test_read_config_errors_name_the_key(tmp_path, edit, key):
    text = MODEL_YAML.replace(*edit)
    assert text != MODEL_YAML
    with pytest.raises(ValueError) as e:
        lfads_torch.read_config(_write(tmp_path, "m.yaml", text))
    assert key in str(e.value)


def test_read_config_not_strict_notes(tmp_path):
    text = MODEL_YAML.replace("ic_enc_seq_len: ${model.ic_enc_seq_len}", "ic_enc_seq_len: 4")
    m, _, notes = lfads_torch.read_config(_write(tmp_path, "m.yaml", text), strict=False)
    assert m["cd_rate"] == 0.25
    assert any("transforms[0].ic_enc_seq_len: not imported" in n for n in notes)
    with pytest.raises(ValueError, match="datamodule.shuffle"):
        lfads_torch.read_config(_write(tmp_path, "m.yaml", MODEL_YAML),
                                {"batch_size": 8, "shuffle": True})


# ------------------------------------------------------------------ checkpoints

# lfads_fast's names (torch_reference.param_shapes) -> lfads-torch's state-dict names, written
# here independently of lfads_fast.lfads_torch from lfads-torch's module attributes.
_CELLS = {"ic_enc_fwd": "encoder.ic_enc.fwd_gru.cell", "ic_enc_bwd": "encoder.ic_enc.bwd_gru.cell",
          "ci_enc_fwd": "encoder.ci_enc.fwd_gru.cell", "ci_enc_bwd": "encoder.ci_enc.bwd_gru.cell",
          "con": "decoder.rnn.cell.con_cell", "gen": "decoder.rnn.cell.gen_cell"}
_OTHERS = {"ic_enc_h0": "encoder.ic_enc_h0", "ci_enc_h0": "encoder.ci_enc_h0",
           "ic_linear_W": "encoder.ic_linear.weight", "ic_linear_b": "encoder.ic_linear.bias",
           "con_h0": "decoder.con_h0", "co_linear_W": "decoder.rnn.cell.co_linear.weight",
           "co_linear_b": "decoder.rnn.cell.co_linear.bias",
           "ic_to_g0_W": "decoder.ic_to_g0.weight", "ic_to_g0_b": "decoder.ic_to_g0.bias",
           "fac_W": "decoder.rnn.cell.fac_linear.weight", "readout_W": "readout.0.weight",
           "readout_b": "readout.0.bias", "ic_prior_mean": "ic_prior.mean",
           "co_prior_logtau": "co_prior.logtaus", "co_prior_lognvar": "co_prior.lognvars"}


class _Blob:
    """An arbitrary object in a checkpoint (what weights-only loading must refuse)."""


def _torch_state_dict(params, cfg, rng):
    """The reference's parameters under lfads-torch's names and shapes, with a non-zero
    bias_hh taken out of each b_ih (the sum, which enters the gates, is unchanged)."""
    sd = {}
    for name, value in params.items():
        for ours, theirs in _CELLS.items():
            if name not in _OTHERS and name.startswith(ours + "_"):
                part = {"W_ih": "weight_ih", "b_ih": "bias_ih", "W_hh": "weight_hh"}[name[len(ours) + 1:]]
                if part == "bias_ih":
                    hh = rng.normal(scale=0.3, size=value.shape)
                    sd[f"{theirs}.bias_hh"] = torch.tensor(hh)
                    value = value - hh
                sd[f"{theirs}.{part}"] = torch.tensor(value)
                break
        else:
            v = torch.tensor(value)
            if name in ("ic_enc_h0", "ci_enc_h0"):
                v = v.reshape(2, 1, -1)
            if name == "con_h0":
                v = v.reshape(1, -1)
            sd[_OTHERS[name]] = v
    sd["ic_prior.logvar"] = torch.full((cfg.ic_dim,), float(np.log(cfg.ic_prior_var)),
                                       dtype=torch.float64)
    return sd


def _setup(seed=0):
    rcfg = ref.make_config(encod_data_dim=5, recon_data_dim=7, encod_seq_len=9, recon_seq_len=11,
                           ic_enc_dim=6, ci_enc_dim=3, con_dim=4, co_dim=2, ic_dim=3, gen_dim=8,
                           fac_dim=4, ic_prior_var=0.07, dropout_rate=0.0, cd_rate=0.0)
    fields = {k: getattr(rcfg, k) for k in LFADSConfig.__dataclass_fields__ if hasattr(rcfg, k)}
    cfg = LFADSConfig.from_dict({**fields, "ic_prior_var": 0.1})  # the checkpoint's wins
    rng = np.random.default_rng(seed)
    params = ref.init_params(rcfg, seed)
    # Non-trivial priors and initial states, so that a dropped tensor shows.
    for name in ("ic_enc_h0", "ci_enc_h0", "con_h0", "ic_prior_mean", "ic_linear_b",
                 "readout_b", "ic_to_g0_b"):
        params[name] = params[name] + 0.2 * rng.normal(size=params[name].shape)
    encod = rng.poisson(1.0, size=(4, rcfg.encod_seq_len, rcfg.encod_data_dim)).astype(float)
    recon = rng.poisson(1.0, size=(4, rcfg.recon_seq_len, rcfg.recon_data_dim)).astype(float)
    return rcfg, cfg, params, _torch_state_dict(params, rcfg, rng), encod, recon


def test_state_dict_forward_parity_float64():
    from lfads_fast.model import LFADS

    rcfg, cfg, params, sd, encod, recon = _setup()
    imported, new_cfg = lfads_torch.state_dict_to_params(sd, cfg)
    assert new_cfg.ic_prior_var == pytest.approx(0.07)
    model = LFADS(new_cfg, dtype=np.float64)
    for name, value in imported.items():
        model.params[name][...] = value
    _, _, expected = ref.reference_loss_and_grads(params, rcfg, encod, recon)
    out = model.forward(encod)
    for key in ("output_params", "factors", "gen_states", "co_means", "ic_mean", "ic_std"):
        np.testing.assert_allclose(out[key], expected[key], rtol=PARITY_TOL_F64,
                                   atol=PARITY_TOL_F64, err_msg=key)
    # The KL term uses the prior's variance read from the checkpoint.
    r_terms, _, _ = ref.reference_loss_and_grads(params, rcfg, encod, recon)
    assert model.forward(encod, recon_data=recon)["terms"]["kl_ic"] == pytest.approx(
        r_terms["kl_ic"], rel=1e-9)


def test_import_lightning_checkpoint(tmp_path):
    from lfads_fast.train import load_model

    rcfg, cfg, params, sd, encod, recon = _setup(1)
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"epoch": 3, "global_step": 12, "state_dict": {f"{k}": v.float() for k, v in sd.items()},
                "hyper_parameters": {"gen_dim": 8}}, path)
    model = lfads_torch.import_checkpoint(path, cfg)
    _, _, expected = ref.reference_loss_and_grads(params, rcfg, encod, recon)
    np.testing.assert_allclose(model.forward(encod)["output_params"], expected["output_params"],
                               rtol=PARITY_TOL_F32, atol=PARITY_TOL_F32)
    out = lfads_torch.write_checkpoint(tmp_path / "model.h5", model, source=str(path))
    again = load_model(out)
    np.testing.assert_array_equal(again.flat, model.flat)
    assert again.config.ic_prior_var == pytest.approx(0.07)


def test_checkpoint_errors_name_the_tensor(tmp_path):
    _, cfg, _, sd, _, _ = _setup(2)
    broken = dict(sd)
    del broken["decoder.rnn.cell.gen_cell.weight_hh"]
    with pytest.raises(ValueError, match="decoder.rnn.cell.gen_cell.weight_hh"):
        lfads_torch.state_dict_to_params(broken, cfg)
    extra = {**sd, "readin.0.weight": torch.zeros(5, 5)}
    with pytest.raises(ValueError, match="readin.0.weight"):
        lfads_torch.state_dict_to_params(extra, cfg)
    wrong = {**sd, "readout.0.weight": torch.zeros(9, 4)}
    with pytest.raises(ValueError, match=r"readout.0.weight has shape \(9, 4\)"):
        lfads_torch.state_dict_to_params(wrong, cfg)
    # Not weights only: an arbitrary object refuses to load without running its code.
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": sd, "callbacks": _Blob()}, path)
    with pytest.raises(ValueError, match="weights only"):
        lfads_torch.import_checkpoint(path, cfg)


def test_test_split_without_recon_data(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "lt.h5"
    with h5py.File(path, "w") as f:
        for split, b in (("train", 6), ("valid", 3), ("test", 2)):
            f[f"{split}_encod_data"] = rng.poisson(1, (b, 8, 4)).astype(np.float32)
            if split != "test":
                f[f"{split}_recon_data"] = rng.poisson(1, (b, 10, 5)).astype(np.float32)
    ds = data.load_dataset(path)
    assert ds.test.recon_data.shape == (2, 10, 5) and np.isnan(ds.test.recon_data).all()
    from lfads_fast import posterior
    from lfads_fast.model import LFADS
    from lfads_fast.train import config_for_data

    model = LFADS(config_for_data(ds, ic_enc_dim=4, ci_enc_dim=2, con_dim=2, co_dim=1, ic_dim=2,
                                  gen_dim=4, fac_dim=3))
    out = posterior.posterior_outputs(model, ds, n_samples=2)
    assert out["test"]["output_params"].shape == (2, 10, 5)
    assert np.isfinite(out["test"]["output_params"]).all()


def test_cli_import_then_infer(tmp_path, capsys):
    from lfads_fast.cli import main, load_config

    _, cfg, _, sd, encod, _ = _setup(4)
    model_yaml = yaml.safe_load(MODEL_YAML)
    model_yaml.update({k: getattr(cfg, k) for k in (
        "encod_data_dim", "encod_seq_len", "recon_seq_len", "ic_enc_dim", "ci_enc_dim",
        "con_dim", "co_dim", "ic_dim", "gen_dim", "fac_dim")})
    model_yaml["readout"]["modules"][0]["out_features"] = cfg.recon_data_dim
    myaml = tmp_path / "m.yaml"
    myaml.write_text(yaml.safe_dump(model_yaml))
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {k: v.float() for k, v in sd.items()}}, ckpt)
    out = tmp_path / "imported"
    assert main(["import-lfads-torch", str(myaml), "--datamodule",
                 str(_write(tmp_path, "d.yaml", DATAMODULE_YAML)), "--checkpoint", str(ckpt),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: datamodule.num_workers" in printed
    m, t = load_config(out / "config.yaml")
    assert m["cd_rate"] == 0.25 and t["batch_size"] == 64
    assert m["ic_prior_var"] == pytest.approx(0.07)  # from the checkpoint
    # The converted checkpoint runs in infer.
    h5 = tmp_path / "d.h5"
    rng = np.random.default_rng(5)
    with h5py.File(h5, "w") as f:
        for split, b in (("train", 4), ("valid", 2)):
            f[f"{split}_encod_data"] = rng.poisson(1, (b, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float32)
            f[f"{split}_recon_data"] = rng.poisson(1, (b, cfg.recon_seq_len, cfg.recon_data_dim)).astype(np.float32)
    assert main(["infer", str(out / "model.h5"), str(h5), "--out", str(tmp_path / "p.h5"),
                 "--samples", "0"]) == 0
    # Bad YAML key from the command line: exit 2, the key named.
    bad = tmp_path / "bad.yaml"
    bad.write_text(MODEL_YAML.replace("gen_dim:", "generator_dim:"))
    assert main(["import-lfads-torch", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "model.generator_dim" in capsys.readouterr().err
