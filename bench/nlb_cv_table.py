"""Markdown table of bench/nlb_cv.py results: one row per configuration (mean +- std over
folds of co-bps, velocity R^2, fp-bps, epochs, divergences, training seconds per fold) and
one row for NLB's smoothing baseline (the same folds, so every configuration's smoothing row
is identical; it is printed once).

    python bench/nlb_cv_table.py runs/cv/defaults runs/cv/cd0.3 ...
"""
import json
import sys
from pathlib import Path


def main(dirs):
    rows, smoothing = [], None
    for d in dirs:
        cv = json.loads((Path(d) / "cv.json").read_text())
        folds = cv["folds"]
        m, s = cv["mean"]["lfads"], cv["std"]["lfads"]
        config = cv.get("config", {})
        preset = [f"preset {config['preset']}"] if config.get("preset") else []
        over = " ".join(preset + config.get("overrides", [])) or "(the defaults)"
        ratio = m["co_bps"] / cv["mean"]["smoothing"]["co_bps"]
        div = sum(f["scores"]["lfads"]["divergences"] for f in folds)
        stops = sorted({f["scores"]["lfads"]["stop_reason"] for f in folds})
        rows.append(f"| {Path(d).name} | {len(folds)} | {m['co_bps']:.4f} ± {s['co_bps']:.4f} | "
                    f"{ratio:.2f} | {m['vel_r2']:.4f} ± {s['vel_r2']:.4f} | "
                    f"{m['fp_bps']:.4f} ± {s['fp_bps']:.4f} | {m['epochs']:.0f} "
                    f"({', '.join(stops)}) | {m['best_epoch']:.0f} | {div} | "
                    f"{m['train_seconds']:.0f} | `{over}` |")
        sm, ss = cv["mean"]["smoothing"], cv["std"]["smoothing"]
        smoothing = (f"| smoothing (NLB recipe) | {len(folds)} | {sm['co_bps']:.4f} ± "
                     f"{ss['co_bps']:.4f} | 1.00 | {sm['vel_r2']:.4f} ± {ss['vel_r2']:.4f} | — | "
                     "— | — | — | — | kern_sd 60 ms, GLM alpha 0.1 |")
    print("| configuration | folds | co-bps | × smoothing | vel R² | fp-bps | epochs (stop) | "
          "best epoch | divergences | train s / fold | settings |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    if smoothing:
        print(smoothing)


if __name__ == "__main__":
    main(sys.argv[1:])
