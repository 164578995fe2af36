"""A way in from lfads-torch: its Hydra configs and its Lightning checkpoints.

Configs: ``read_config`` reads lfads-torch's model YAML (configs/model/*.yaml: the LFADS
constructor's arguments, with nested ``_target_`` objects for priors, augmentations, read-in
and read-out) and optionally its datamodule and trainer YAMLs, into LFADSConfig and
TrainConfig fields. Every key is accounted for: it maps to a field, is one whose value here
is lfads-torch's only behaviour (``variational: true``, ``ic_enc_seq_len: 0``, a Poisson
reconstruction, an identity read-in ...), or is bookkeeping with no effect on the model
(``num_workers``, ``_target_`` ...). A key with no counterpart, or a value lfads_fast cannot
reproduce, is an error that names the key and says why; ``strict=False`` turns those into
notes instead. Hydra interpolations ``${model.X}`` are resolved against the model section.

Checkpoints: ``import_checkpoint`` reads a Lightning checkpoint's ``state_dict`` with
``torch.load(weights_only=True)`` (no pickle code runs) and maps lfads-torch's parameter
names onto lfads_fast's layout. lfads-torch's GRU cells also carry ``bias_hh`` (frozen,
usually zero); both of its parts enter the gates exactly where ``b_ih`` does (before the
reset gate multiplies anything), so they are added to ``b_ih``. Missing or extra tensors
and shape mismatches are errors naming the tensor.
"""
from __future__ import annotations

import difflib
import os
import re

import numpy as np
import yaml

from .config import LFADSConfig, read_yaml
from .errors import MissingOptionalPart

__all__ = ["read_config", "import_checkpoint", "state_dict_to_params", "param_names",
           "write_config_yaml", "write_checkpoint"]

# Model keys of lfads-torch with the same name and meaning in LFADSConfig.
_MODEL_SAME = ("encod_data_dim", "encod_seq_len", "recon_seq_len", "ext_input_dim", "ic_enc_dim",
               "ci_enc_dim", "ci_lag", "con_dim", "co_dim", "ic_dim", "gen_dim", "fac_dim",
               "dropout_rate", "cell_clip", "ic_post_var_min", "loss_scale", "recon_reduce_mean",
               "l2_ic_enc_scale", "l2_ci_enc_scale", "l2_gen_scale", "l2_con_scale",
               "kl_ic_scale", "kl_co_scale")
# Model keys of lfads-torch that are TrainConfig fields here (same names).
_TRAIN_SAME = ("lr_init", "lr_stop", "lr_decay", "lr_patience", "lr_adam_beta1",
               "lr_adam_beta2", "lr_adam_epsilon", "lr_scheduler", "weight_decay",
               "l2_start_epoch", "l2_increase_epoch", "kl_start_epoch", "kl_increase_epoch",
               "sv_rate", "sv_seed")
# lfads-torch keys whose only supported value is lfads-torch's default behaviour here.
_FIXED = {"ic_enc_seq_len": 0, "variational": True, "gen_type": "gru"}
# Bookkeeping keys: no effect on the model or its training.
_IGNORED_MODEL = ("_target_",)
_IGNORED_DATAMODULE = ("_target_", "num_workers", "data_path", "dataset_name", "phase",
                       "bin_width", "dm_sv_rate", "dm_sv_seed", "dm_ic_enc_seq_len",
                       "reshuffle_tvs_seed", "reshuffle_tv_seed")
_IGNORED_TRAINER = ("_target_", "accelerator", "devices", "gpus", "log_every_n_steps",
                    "enable_progress_bar", "enable_model_summary", "enable_checkpointing",
                    "default_root_dir", "logger", "callbacks", "num_sanity_val_steps",
                    "check_val_every_n_epoch", "precision", "deterministic")
# Datamodule and trainer sections: (key -> TrainConfig field, ignored keys, why others fail).
_SECTIONS = {
    "datamodule": ({"batch_size": "batch_size"}, _IGNORED_DATAMODULE,
                   "lfads_fast reads the data file given to train; this datamodule option has "
                   "no counterpart"),
    "trainer": ({"max_epochs": "max_epochs", "gradient_clip_val": "max_grad_norm"},
                _IGNORED_TRAINER, "no counterpart in TrainConfig"),
}


def read_config(model_yaml, datamodule_yaml=None, trainer_yaml=None, *, strict: bool = True
                ) -> tuple[dict, dict, list[str]]:
    """lfads-torch config files -> (LFADSConfig fields, TrainConfig fields, notes).

    Args:
        model_yaml: path (or an already-parsed mapping) of lfads-torch's model config; a
            whole composed config with a ``model`` section (and optionally ``datamodule``
            and ``trainer``) is accepted too.
        datamodule_yaml, trainer_yaml: optional paths (or mappings).
        strict: raise on keys without counterpart (else they become notes).

    Returns:
        model fields, train fields, and notes (one line per key that was ignored or, with
        strict=False, had no counterpart).

    Raises:
        ValueError: a key without counterpart (strict) or unknown to lfads-torch, a value of
            the wrong kind, or an interpolation that does not resolve; the message names
            the key (``model.train_aug_stack.transforms[1]``, ...).
    """
    model = _load(model_yaml, "model")
    datamodule = _load(datamodule_yaml, "datamodule") if datamodule_yaml is not None else None
    trainer = _load(trainer_yaml, "trainer") if trainer_yaml is not None else None
    if "model" in model and isinstance(model["model"], dict):  # a composed config
        datamodule = datamodule if datamodule is not None else model.get("datamodule")
        trainer = trainer if trainer is not None else model.get("trainer")
        model = model["model"]
    model = _resolve(model, model, "model")
    r = _Reader(strict)
    for key, value in model.items():
        where = f"model.{key}"
        if key in _MODEL_SAME:
            r.model[key] = value
        elif key in _TRAIN_SAME:
            r.train[key] = value
        elif key in _FIXED:
            r.fixed(where, value, _FIXED[key])
        elif key in _IGNORED_MODEL:
            continue
        elif key in _NESTED:
            _NESTED[key](r, where, value)
        else:
            r.unknown(where, key, _MODEL_SAME + _TRAIN_SAME + tuple(_FIXED) + tuple(_NESTED))
    for name, section in (("datamodule", datamodule), ("trainer", trainer)):
        if section is None:
            continue
        mapped, ignored, why = _SECTIONS[name]
        for key, value in _resolve(section, model, name).items():
            where = f"{name}.{key}"
            if key in mapped:
                r.train[mapped[key]] = value
            elif key in ignored:
                r.notes.append(f"{where}: ignored (no effect on the model)")
            else:
                r.missing(where, why)
    from .train import TrainConfig

    _check_types(r.model, LFADSConfig, "model")
    _check_types(r.train, TrainConfig, "train")
    return r.model, r.train, r.notes


def write_config_yaml(path, model_fields: dict, train_fields: dict, notes=()) -> str:
    """Writes lfads_fast's config YAML (sections model, train), for ``train --config``."""
    path = os.fspath(path)
    header = "".join(f"# {n}\n" for n in notes)
    text = yaml.safe_dump({"model": model_fields, "train": train_fields}, sort_keys=True)
    with open(path, "w") as f:
        f.write("# Converted from lfads-torch configs by lfads-fast import-lfads-torch.\n"
                + header + text)
    return path


def state_dict_to_params(state_dict: dict, cfg: LFADSConfig) -> tuple[dict, LFADSConfig]:
    """lfads-torch's parameter tensors -> lfads_fast's named parameters for cfg.

    Args:
        state_dict: name -> array (numpy or torch tensors), lfads-torch's names
            (``encoder.ic_enc.fwd_gru.cell.weight_ih``, ``decoder.rnn.cell.gen_cell.bias_hh``,
            ``readout.0.weight``, ``ic_prior.mean`` ...), optionally prefixed ``model.``.
        cfg: the model's configuration (sizes must match the tensors).

    Returns:
        (params: lfads_fast name -> float64 array, cfg with ic_prior_var taken from the
        checkpoint's ic_prior.logvar).

    Raises:
        ValueError: a tensor is missing, extra, or of the wrong shape (named), or the
            prior's log-variance differs across dimensions.
    """
    sd = {_strip(k): _to_numpy(v) for k, v in state_dict.items()}
    names = param_names(cfg)
    missing = sorted(k for k in names.values() if k not in sd)
    missing += [k for k in ("ic_prior.logvar",) if k not in sd]
    if missing:
        raise ValueError(f"the checkpoint lacks the tensors {', '.join(missing)} that a model with "
                         f"this config needs")
    used = set(names.values()) | {"ic_prior.logvar"} | {
        n.replace("bias_ih", "bias_hh") for n in names.values() if n.endswith("bias_ih")}
    extra = sorted(k for k in sd if k not in used)
    if extra:
        raise ValueError(f"the checkpoint has tensors with no place in this model: "
                         f"{', '.join(extra)} (a read-in layer, another reconstruction or a "
                         "larger model than the config describes?)")
    from .model import param_layout

    shapes = dict(param_layout(cfg))
    params = {}
    for ours, theirs in names.items():
        value = np.asarray(sd[theirs], np.float64)
        if theirs.endswith("bias_ih"):
            hh = theirs.replace("bias_ih", "bias_hh")
            if hh in sd:
                value = value + np.asarray(sd[hh], np.float64).reshape(value.shape)
        if ours in ("ic_enc_h0", "ci_enc_h0", "con_h0") and value.size == np.prod(shapes[ours]):
            value = value.reshape(shapes[ours])  # lfads-torch keeps a batch axis of 1
        if value.shape != tuple(shapes[ours]):
            raise ValueError(f"{theirs} has shape {value.shape}, but this config needs "
                             f"{tuple(shapes[ours])} for {ours}")
        params[ours] = value
    logvar = np.asarray(sd["ic_prior.logvar"], np.float64).reshape(-1)
    if logvar.size != cfg.ic_dim or np.ptp(logvar) > 1e-6 * max(1.0, np.abs(logvar).max()):
        raise ValueError(f"ic_prior.logvar must be {cfg.ic_dim} equal values (lfads_fast's prior "
                         f"variance is one number), got {logvar}")
    new = LFADSConfig.from_dict({**cfg.to_dict(), "ic_prior_var": float(np.exp(logvar[0]))})
    return params, new


def param_names(cfg: LFADSConfig) -> dict[str, str]:
    """lfads_fast parameter name -> lfads-torch state-dict name, for one session."""
    if cfg.multisession:
        raise ValueError("lfads-torch checkpoints import for one session (its read-in must be "
                         "the identity)")
    names = {"ic_enc_h0": "encoder.ic_enc_h0", "ic_linear_W": "encoder.ic_linear.weight",
             "ic_linear_b": "encoder.ic_linear.bias",
             "ic_to_g0_W": "decoder.ic_to_g0.weight", "ic_to_g0_b": "decoder.ic_to_g0.bias",
             "fac_W": "decoder.rnn.cell.fac_linear.weight",
             "readout_W": "readout.0.weight", "readout_b": "readout.0.bias",
             "ic_prior_mean": "ic_prior.mean"}
    gru = {"W_ih": "weight_ih", "b_ih": "bias_ih", "W_hh": "weight_hh"}
    cells = {"ic_enc_fwd": "encoder.ic_enc.fwd_gru.cell", "ic_enc_bwd": "encoder.ic_enc.bwd_gru.cell",
             "gen": "decoder.rnn.cell.gen_cell"}
    if cfg.use_con:
        cells.update({"ci_enc_fwd": "encoder.ci_enc.fwd_gru.cell",
                      "ci_enc_bwd": "encoder.ci_enc.bwd_gru.cell",
                      "con": "decoder.rnn.cell.con_cell"})
        names.update({"ci_enc_h0": "encoder.ci_enc_h0", "con_h0": "decoder.con_h0",
                      "co_linear_W": "decoder.rnn.cell.co_linear.weight",
                      "co_linear_b": "decoder.rnn.cell.co_linear.bias",
                      "co_prior_logtau": "co_prior.logtaus",
                      "co_prior_lognvar": "co_prior.lognvars"})
    for ours, theirs in cells.items():
        for a, b in gru.items():
            names[f"{ours}_{a}"] = f"{theirs}.{b}"
    return names


def import_checkpoint(path, cfg: LFADSConfig):
    """An lfads-torch Lightning checkpoint's weights as an lfads_fast model (float32).

    Args:
        path: the .ckpt file (a dict with ``state_dict``, or a bare state dict).
        cfg: the model's configuration (e.g. from read_config with the data's sizes).

    Returns:
        lfads_fast.LFADS with the checkpoint's parameters.

    Raises:
        ImportError: torch is not installed (it reads the file).
        ValueError: the file is not a weights-only-loadable checkpoint, or its tensors do
            not fit cfg (named).
    """
    try:
        import torch
    except ImportError as e:
        raise MissingOptionalPart("reading lfads-torch checkpoints needs torch (pip install torch)") from e
    from .model import LFADS

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and others for unsafe content
        raise ValueError(f"{path}: cannot be read as weights only (torch.load(weights_only="
                         f"True) refused it: {str(e).splitlines()[0]})") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a Lightning checkpoint with a state_dict")
    params, cfg = state_dict_to_params(state, cfg)
    model = LFADS(cfg, seed=0)
    for name, value in params.items():
        model.params[name][...] = value
    return model


def write_checkpoint(path, model, train_fields: dict | None = None, source: str = "") -> str:
    """Writes a model as an lfads_fast checkpoint (fresh Adam state, epoch 0), loadable by
    train.load_model and ``lfads-fast infer``."""
    from .train import TrainConfig, save_model

    return save_model(path, model, TrainConfig.from_dict(train_fields or {}), imported_from=source)


# ---------------------------------------------------------------------- nested sections


class _Reader:
    def __init__(self, strict):
        self.strict = strict
        self.model: dict = {}
        self.train: dict = {}
        self.notes: list[str] = []

    def missing(self, where, why):
        if self.strict:
            raise ValueError(f"{where}: {why}")
        self.notes.append(f"{where}: not imported ({why})")

    def fixed(self, where, value, supported):
        if value != supported:
            self.missing(where, f"only {supported!r} is supported (lfads-torch's default), got "
                         f"{value!r}")

    def unknown(self, where, key, known):
        close = difflib.get_close_matches(key, sorted(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{where}: not an lfads-torch model option{hint}")


def _target(where, value) -> str:
    if not isinstance(value, dict) or "_target_" not in value:
        raise ValueError(f"{where}: expected a mapping with _target_, got {value!r}")
    return str(value["_target_"]).rsplit(".", 1)[-1]


def _params(r, where, value, allowed):
    for k in value:
        if k != "_target_" and k not in allowed:
            r.missing(f"{where}.{k}", "no counterpart")


def _co_prior(r, where, value):
    kind = _target(where, value)
    if kind != "AutoregressiveMultivariateNormal":
        return r.missing(where, f"only the AR(1) prior (AutoregressiveMultivariateNormal) is "
                         f"implemented, got {kind}")
    _params(r, where, value, ("tau", "nvar", "shape"))
    r.model["co_prior_tau"], r.model["co_prior_nvar"] = value.get("tau", 10.0), value.get("nvar", 0.1)
    _same_size(where, value.get("shape"), "co_dim", r, value)


def _ic_prior(r, where, value):
    kind = _target(where, value)
    if kind != "MultivariateNormal":
        return r.missing(where, f"only the Gaussian prior (MultivariateNormal) is implemented, "
                         f"got {kind}")
    _params(r, where, value, ("mean", "variance", "shape"))
    r.model["ic_prior_mean"] = value.get("mean", 0.0)
    r.model["ic_prior_var"] = value.get("variance", 0.1)
    _same_size(where, value.get("shape"), "ic_dim", r, value)


def _same_size(where, shape, field, r, value):
    if shape is not None and field in r.model and shape != r.model[field]:
        raise ValueError(f"{where}.shape is {shape} but model.{field} is {r.model[field]}")


def _reconstruction(r, where, value):
    items = value if isinstance(value, list) else [value]
    if len(items) != 1 or _target(f"{where}[0]", items[0]) != "Poisson":
        kinds = [_target(f"{where}[{i}]", v) for i, v in enumerate(items)]
        r.missing(where, f"one Poisson reconstruction is implemented, got {kinds}")


def _readin(r, where, value):
    items = value if isinstance(value, list) else value.get("modules", [value])
    kinds = [_target(f"{where}[{i}]", v) for i, v in enumerate(items)]
    if kinds != ["Identity"]:
        r.missing(where, f"one session with an identity read-in is imported, got {kinds} "
                  "(several sessions: see docs/stitching.md)")


def _readout(r, where, value):
    items = value.get("modules", []) if isinstance(value, dict) and "modules" in value else (
        value if isinstance(value, list) else [value])
    if len(items) != 1:
        return r.missing(where, f"one session's read-out is imported, got {len(items)}")
    item = items[0]
    kind = _target(f"{where}.modules[0]", item)
    if kind not in ("FanInLinear", "Linear"):
        return r.missing(where, f"a linear read-out is imported, got {kind}")
    if "out_features" in item:
        r.model["recon_data_dim"] = item["out_features"]
    fin = item.get("in_features")
    if fin is not None and "fac_dim" in r.model and fin != r.model["fac_dim"]:
        raise ValueError(f"{where}.modules[0].in_features is {fin} but model.fac_dim is "
                         f"{r.model['fac_dim']}")


def _aug_stack(r, where, value, train: bool):
    if value is None:
        return
    kind = _target(where, value)
    if kind != "AugmentationStack":
        return r.missing(where, f"expected an AugmentationStack, got {kind}")
    transforms = value.get("transforms") or []
    for k in value:
        if k not in ("_target_", "transforms", "batch_order", "loss_order"):
            r.missing(f"{where}.{k}", "no counterpart")
    batch_order = value.get("batch_order") or []
    if not isinstance(batch_order, list) or not all(
            isinstance(j, int) and 0 <= j < len(transforms) for j in batch_order):
        raise ValueError(f"{where}.batch_order must list indices of its transforms "
                         f"(0..{len(transforms) - 1}), got {batch_order!r}")
    kinds = [_target(f"{where}.transforms[{i}]", t) for i, t in enumerate(transforms)]
    for i, (t, tkind) in enumerate(zip(transforms, kinds)):
        tw = f"{where}.transforms[{i}]"
        if tkind in ("CoordinatedDropout", "TemporalShift") and train and i not in batch_order:
            r.notes.append(f"{tw}: ignored ({tkind} is not in batch_order, so lfads-torch does not "
                           "apply it)")
        elif tkind == "CoordinatedDropout" and train:
            _params(r, tw, t, ("cd_rate", "cd_pass_rate", "ic_enc_seq_len"))
            r.model["cd_rate"] = t.get("cd_rate", 0.0)
            r.model["cd_pass_rate"] = t.get("cd_pass_rate", 0.0)
            r.fixed(f"{tw}.ic_enc_seq_len", t.get("ic_enc_seq_len", 0), 0)
        elif tkind == "TemporalShift" and train:
            _temporal_shift(r, tw, t, i, batch_order, kinds)
        else:
            r.missing(tw, f"the augmentation {tkind} has no counterpart")


def _temporal_shift(r, where, value, index, batch_order, kinds):
    """A TemporalShift that batch_order lists; lfads_fast shifts the data before coordinated
    dropout masks them."""
    _params(r, where, value, ("std", "max_shift"))
    cd = [j for j in batch_order if kinds[j] == "CoordinatedDropout"]
    if cd and batch_order.index(cd[0]) < batch_order.index(index):
        return r.missing(where, "lfads_fast shifts the data before coordinated dropout; this "
                         "batch_order shifts the already masked data")
    # lfads-torch's defaults when the keys are absent.
    r.train["temporal_shift_std"] = value.get("std", 3.0)
    r.train["temporal_shift_max"] = value.get("max_shift", 6)


_NESTED = {
    "co_prior": _co_prior,
    "ic_prior": _ic_prior,
    "reconstruction": _reconstruction,
    "readin": _readin,
    "readout": _readout,
    "train_aug_stack": lambda r, w, v: _aug_stack(r, w, v, True),
    "infer_aug_stack": lambda r, w, v: _aug_stack(r, w, v, False),
}


# ---------------------------------------------------------------------- helpers

_INTERP = re.compile(r"^\$\{model\.([A-Za-z0-9_]+)\}$")


def _load(source, what: str) -> dict:
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lfads-torch {what} config {path} does not exist")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of lfads-torch {what} options")
    return raw


def _resolve(value, model: dict, where: str):
    """Replaces ``${model.X}`` strings by model[X] (recursively)."""
    if isinstance(value, dict):
        return {k: _resolve(v, model, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, model, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        m = _INTERP.match(value.strip())
        if not m or m.group(1) not in model or isinstance(model[m.group(1)], str):
            raise ValueError(f"{where}: cannot resolve the interpolation {value!r} (only "
                             "${model.<key>} of a plain model value is supported)")
        return model[m.group(1)]
    return value


def _check_types(fields: dict, cls, section: str) -> None:
    """Numbers where numbers belong (YAML reads 1e-3 as a string, as in lfads-torch's files)."""
    import dataclasses

    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for k, v in list(fields.items()):
        kind = types.get(k, "")
        if "float" in kind and isinstance(v, str):
            try:
                fields[k] = float(v)
            except ValueError:
                raise ValueError(f"{section}.{k} must be a number, got {v!r}") from None


def _strip(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def _to_numpy(v):
    return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
