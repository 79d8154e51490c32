"""What does each part of a trained MAGNET score contribute?

    python -m utils.magnet_parts RUN_DIR [--k 20]

RUN_DIR is the output folder of a MAGNET run (config.yaml and best.pth). The best epoch's weights are
ranked on the validation and test splits (training items masked, as the trainer does) by:
  full           the model's score (Eqs. 16-21: routed mixture of the template experts)
  full, no cues  the same with h^A = h^S = 0 (f_m zeroed): what the cue channels add to the mixture
  z dot          <z_u, z_i> of the fused backbone (Eq. 6) alone, as LightGCN would score
  z^UI dot       the same on the interaction view only (Eq. 5 on G_UI)
  cue similarity <h^A_u, h^A_i> + <h^S_u, h^S_i>: the modality cues alone (Eqs. 7-8)
and the RMS row norm of r^B, r^A, r^S (Eq. 9) is printed, which says how much weight a template's
share of each channel really carries.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

import utils.synth  # noqa: F401  (registers the synthetic presets)
from mmrec.config import load_config, yaml_load
from mmrec.data import RecDataset
from mmrec.data.sources import ensure_generated
from mmrec.evaluation import evaluate
from mmrec.registry import get_model


class _Scorer(torch.nn.Module):
    """Presents one scoring rule to ``evaluate`` with the model's evaluation cache."""

    def __init__(self, model, score):
        super().__init__()
        self.model, self.score = model, score

    def start_evaluation(self, split=None):
        self.model.start_evaluation(split)

    def end_evaluation(self):
        self.model.end_evaluation()

    def full_sort_predict(self, interaction):
        return self.score(interaction["users"])


def score_parts(model) -> dict:
    """Scoring rules {name: users -> [users, items] scores} of a MAGNET in eval mode."""
    tables = model.encode()
    n_u = model.n_users
    z, z_ui, r_u, r_i = tables["z"], tables["z_ui"], tables["r_user"], tables["r_item"]
    return {
        "full": lambda users: model.full_sort_predict({"users": users}),
        "full, no cues": lambda users: _without_cues(model, users),
        "z dot": lambda users: z[users] @ z[n_u:].T,
        "z^UI dot": lambda users: z_ui[users] @ z_ui[n_u:].T,
        "cue similarity": lambda users: r_u[users, 1] @ r_i[:, 1].T + r_u[users, 2] @ r_i[:, 2].T,
    }


@contextlib.contextmanager
def _cues_zeroed(model):
    """f_A and f_S output 0 inside the block (their parameters are restored afterwards)."""
    saved = [(p, p.detach().clone()) for proj in (model.image_proj, model.text_proj) for p in proj.parameters()]
    try:
        for p, _ in saved:
            p.data.zero_()
        yield
    finally:
        for p, value in saved:
            p.data.copy_(value)


def _without_cues(model, users):
    """The full score with h^A = h^S = 0: the tables are recomputed, not read from the pass's cache."""
    with _cues_zeroed(model):
        model.end_evaluation()
        return model.full_sort_predict({"users": users})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--k", type=int, default=20)
    a = p.parse_args(argv)
    cfg_path, weights = a.run_dir / "config.yaml", a.run_dir / "best.pth"
    for path in (cfg_path, weights):
        if not path.exists():
            p.error(f"{path} is missing: give the output folder of a finished MAGNET run")
    saved = yaml_load(cfg_path.read_text())
    if saved.get("model") != "MAGNET":
        p.error(f"{cfg_path}: model is {saved.get('model')!r}; this tool reads MAGNET runs")
    skip = ("model", "dataset", "hyper_parameters", "device")
    config = load_config("MAGNET", saved["dataset"], {k: v for k, v in saved.items() if k not in skip})
    ensure_generated(config)
    dataset = RecDataset(config)
    model = get_model("MAGNET")(config, dataset)
    state = torch.load(weights, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        tables = model.encode()
        rows = torch.cat([tables["r_user"], tables["r_item"]])
        rms = rows.pow(2).sum(-1).mean(0).sqrt().tolist()
        print(f"{a.run_dir}: best epoch {state.get('epoch')}; RMS row norm r^B {rms[0]:.3f}  r^A {rms[1]:.3f}  "
              f"r^S {rms[2]:.3f}")
        print(f"{'score':16s} valid R@{a.k}  valid N@{a.k}  test R@{a.k}  test N@{a.k}")
        for name, score in score_parts(model).items():
            res = {s: evaluate(_Scorer(model, score), dataset, s, [a.k])["metrics"] for s in ("valid", "test")}
            print(f"{name:16s} {res['valid'][f'recall@{a.k}']:10.4f} {res['valid'][f'ndcg@{a.k}']:12.4f} "
                  f"{res['test'][f'recall@{a.k}']:11.4f} {res['test'][f'ndcg@{a.k}']:11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
