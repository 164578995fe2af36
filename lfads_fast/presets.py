"""Named starting configurations: `--preset NAME` on train, nlb-eval --kfold and tune.

A preset is a set of model and train fields applied before the config file and the --set
overrides (which win over it). The choices and the measurements behind them are in
docs/real_data.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Preset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """model and train: LFADSConfig / TrainConfig fields; description: one line for --help."""

    description: str
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


PRESETS = {
    "nlb": Preset(
        "small real data sets (tens to a few hundred trials, like NLB's MC_Maze_Small): batches "
        "of 16 trials, so that an epoch has several steps, and dropout 0.2; chosen by 5-fold "
        "cross-validation on MC_Maze_Small (docs/real_data.md)",
        model={"dropout_rate": 0.2},
        train={"batch_size": 16}),
    "lfads_torch_mc_maze_small": Preset(
        "lfads-torch's configs/model/nlb_mc_maze_small.yaml (its starting point for population-"
        "based training) with batch size 64: no KL or L2 penalty, no learning-rate schedule",
        model={"ic_enc_dim": 100, "ci_enc_dim": 80, "con_dim": 80, "co_dim": 4, "ic_dim": 100,
               "gen_dim": 100, "fac_dim": 40, "dropout_rate": 0.02, "cd_rate": 0.3,
               "kl_ic_scale": 0.0, "kl_co_scale": 0.0, "l2_gen_scale": 0.0, "l2_con_scale": 0.0},
        train={"lr_scheduler": False, "batch_size": 64}),
}


def get_preset(name: str) -> Preset:
    """The preset called name.

    Raises:
        ValueError: no such preset (the message lists them).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}") from None
