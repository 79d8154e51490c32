"""``python main.py check -d NAME``: a dataset checked in full before any training.

Reads ``data/NAME/`` as its dataset yaml describes it and reports the paper's Table 2 statistics (users,
items, interactions, density, interactions per user and per item), per-split counts, the validation and
test users a run drops (no training interaction), items never interacted with and items absent from
training, and per feature file its shape, dtype and all-zero rows.  Every problem that would stop or
corrupt a run is listed, not only the first, each with the file and the fix (the loader raises the same
findings: one implementation in ``mmrec.data.dataset``).
"""
from __future__ import annotations

import numpy as np

from mmrec.data.dataset import (MODALITIES, DataError, _missing_message, _resolve_data_dir, interaction_problems,
                                read_features, read_interactions)
from mmrec.data.sources import ensure_generated


def check_dataset(config) -> tuple[list[str], list[str]]:
    """(report lines, problems) for the dataset of ``config``; no problems = usable."""
    name = config["dataset"]
    ensure_generated(config)  # a registered synthetic preset is generated on first use
    folder = _resolve_data_dir(config)
    lines = [f"dataset {name}: {folder}"]
    problems: list[str] = []
    inter_path = folder / (config.get("inter_file_name") or f"{name}.inter")
    if not folder.is_dir() or not inter_path.exists():
        return lines, [_missing_message(folder, config)]
    n_items = None
    try:
        users, items, labels = read_interactions(inter_path, config)
    except DataError as err:
        problems.append(str(err))
    else:
        n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
        n = len(users)
        lines += [f"  users {n_users:,}  items {n_items:,}  interactions {n:,}  "
                  f"density {n / (n_users * n_items):.6f} (sparsity {1 - n / (n_users * n_items):.4%})"]
        per_user = np.bincount(users, minlength=n_users)
        per_item = np.bincount(items, minlength=n_items)
        lines.append(f"  interactions per user: mean {per_user.mean():.2f}, min {per_user.min()}, max {per_user.max()}; "
                     f"per item: mean {per_item.mean():.2f}, min {per_item.min()}, max {per_item.max()}")
        counts = {lab: int((labels == lab).sum()) for lab in (0, 1, 2)}
        lines.append(f"  split (x_label): train {counts[0]:,}  valid {counts[1]:,}  test {counts[2]:,}")
        has_train = np.bincount(users[labels == 0], minlength=n_users) > 0
        for lab, split in ((1, "valid"), (2, "test")):
            cold = np.unique(users[(labels == lab) & ~has_train[users]])
            if cold.size:
                lines.append(f"  {split}: {cold.size} user(s) without a training interaction are dropped from "
                             f"evaluation (filter_out_cod_start_users)")
        never = int((per_item == 0).sum())
        no_train = int((np.bincount(items[labels == 0], minlength=n_items) == 0).sum())
        lines.append(f"  items never interacted with: {never}; items absent from training: {no_train} "
                     "(they can only be reached through content)")
        if (per_user == 0).any():
            lines.append(f"  user ids never used: {int((per_user == 0).sum())} (ids are max userID + 1 rows)")
        problems += interaction_problems(inter_path, users, items, labels,
                                         config.get("inter_splitting_label", "x_label"))
    for modality, key in MODALITIES.items():
        file_name = config.get(key)
        if not file_name:
            lines.append(f"  {key}: none (ID-only models only)")
            continue
        path = folder / file_name
        if not path.exists():
            problems.append(f"{path}: missing; add the .npy file or set {key}: null in configs/dataset/{name}.yaml")
            continue
        _, found, stats = read_features(path, n_items)
        problems += found
        zero = stats.get("all_zero_rows")
        lines.append(f"  {key}: {path.name} shape {tuple(stats.get('shape', ()))} dtype {stats.get('dtype')}"
                     + (f", all-zero rows {zero}" if zero is not None else ""))
        if stats.get("dtype") not in (None, "float32"):
            lines.append(f"    note: {stats['dtype']} is read as float32")
    return lines, problems


def main_check(config) -> int:
    """Print the report and every problem; 0 when the dataset is usable, 2 otherwise."""
    lines, problems = check_dataset(config)
    print("\n".join(lines))
    if not problems:
        print("OK: usable")
        return 0
    print(f"{len(problems)} problem(s):")
    for i, problem in enumerate(problems, 1):
        print(f"  {i}. {problem}")
    return 2

