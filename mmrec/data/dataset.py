"""Loading MMRec-format data: ``<name>.inter`` (userID itemID rating timestamp x_label, tab-separated,
with a header) plus ``image_feat.npy`` / ``text_feat.npy`` (row i = item i).

Everything is validated before any model is built; each problem is one line naming the file, the field
and the fix (``DataError``).  Splits: ``x_label`` (MMRec: 0 train, 1 valid, 2 test) or ``random`` (a fresh
per-user split with MMRec's labelling rule, seeded by ``split_seed``).
"""
from __future__ import annotations

import difflib
import hashlib
import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from mmrec.cache import ArtifactCache
from mmrec.config import CONFIG_DIR
from mmrec.data.sources import ensure_generated, generated_names

log = logging.getLogger(__name__)

AMAZON_DATASETS = {"baby", "sports", "clothing", "elec", "electronics"}
DRIVE_URL = "https://drive.google.com/drive/folders/13cBy1EA_saTUuXxVllKgtfci2A09jyaG"
MODALITIES = {"v": "vision_feature_file", "t": "text_feature_file"}


class DataError(ValueError):
    """Bad or missing input data, reported before training starts."""


def _resolve_data_dir(config) -> Path:
    from mmrec.config import ROOT

    base = Path(config["data_path"])
    if not base.is_absolute():
        base = ROOT / base
    return base / config["dataset"]


def _missing_message(folder: Path, config) -> str:
    name = config["dataset"]
    expected = [config.get("inter_file_name") or f"{name}.inter", config.get("vision_feature_file"),
                config.get("text_feature_file")]
    expected = [e for e in expected if e]
    msg = (f"dataset folder {folder} is missing or incomplete: expected {', '.join(expected)} there "
           f"(MMRec format, see README 'Datasets').")
    if name in generated_names():
        msg += (f" {name!r} is a synthetic preset: `python main.py prepare {name}` generates it (from Python: "
                f"mmrec.data.sources.ensure_generated(config) before loading).")
    elif name.lower() in AMAZON_DATASETS:
        msg += f" Download the '{name}' folder from MMRec's Google Drive ({DRIVE_URL}) into {folder.parent}/."
    elif not folder.exists():  # an unknown name: say what exists
        present = sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) if folder.parent.is_dir() else []
        known = set(present) | generated_names() | set(AMAZON_DATASETS)
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        msg += (f" Datasets in {folder.parent}: {', '.join(present) or 'none'}; generated on first use: "
                f"{', '.join(sorted(generated_names())) or 'none registered (import utils.synth)'}; downloadable (MMRec): "
                f"{', '.join(sorted(AMAZON_DATASETS))}.")
    return msg


def mmrec_split_labels(users: np.ndarray, seed: int | np.random.Generator) -> np.ndarray:
    """MMRec's per-user labelling on a fresh shuffle: users with < 10 interactions put one interaction
    in valid and one in test; others floor(0.2 n) in valid+test, floor(half of that) in valid, the rest
    in test.  Vectorised; returns x_label (0/1/2) aligned with ``users``."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = users.shape[0]
    order = np.lexsort((rng.random(n), users))  # group by user, random order inside each user
    sorted_users = users[order]
    counts = np.bincount(sorted_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n) - starts[sorted_users]
    cnt = counts[sorted_users]
    n_vt = np.where(cnt < 10, 2, np.floor(0.2 * cnt).astype(np.int64))
    n_valid = np.where(cnt < 10, 1, n_vt // 2)
    n_train = cnt - n_vt
    label_sorted = np.where(rank < n_train, 0, np.where(rank < n_train + n_valid, 1, 2))
    labels = np.empty(n, dtype=np.int64)
    labels[order] = label_sorted
    return labels


class RecDataset:
    """One dataset, split into train / valid / test, with its item features.

    Attributes: ``n_users``, ``n_items``, ``train_matrix`` / ``valid_matrix`` / ``test_matrix`` (CSR,
    users x items, 1.0 per interaction), ``train_users`` / ``train_items`` (int64 arrays), ``features``
    (dict 'v'/'t' -> float32 array, only those configured), ``cache`` (ArtifactCache).
    """

    def __init__(self, config):
        self.config = config
        self.name = config["dataset"]
        folder = _resolve_data_dir(config)  # a synthetic preset is generated before, by ensure_generated
        self.folder = folder
        inter_path, feature_paths = _check_files(folder, config)
        users, items, labels = self._read_inter(inter_path)
        self.n_users = int(users.max()) + 1
        self.n_items = int(items.max()) + 1
        split = config.get("split", "x_label")
        if split == "random":
            labels = mmrec_split_labels(users, int(config["split_seed"]))
        elif split != "x_label":
            raise DataError(f"config 'split' is {split!r}: use x_label or random")
        self._build_splits(inter_path, users, items, labels)
        self.features = {m: self._read_features(path, m) for m, path in feature_paths.items()}
        self._feature_hashes: dict[str, str] = {}
        self._feature_paths = feature_paths
        cache_dir = config.get("cache_dir")
        if cache_dir:
            from mmrec.config import ROOT

            cache_dir = Path(cache_dir)
            cache_dir = cache_dir if cache_dir.is_absolute() else ROOT / cache_dir
        self.cache = ArtifactCache(cache_dir)

    # ------------------------------------------------------------------------------------------
    def _read_inter(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return read_interactions(path, self.config)

    def _build_splits(self, path: Path, users, items, labels) -> None:
        problems = interaction_problems(path, users, items, labels, self.config.get("inter_splitting_label", "x_label"))
        if problems:
            more = (f" (and {len(problems) - 1} more problem(s): python main.py check -d {self.name} lists them all)"
                    if len(problems) > 1 else "")
            raise DataError(problems[0] + more)
        train = labels == 0
        self.train_users = users[train]
        self.train_items = items[train]
        shape = (self.n_users, self.n_items)
        self.train_matrix = self._csr(self.train_users, self.train_items, shape)
        has_train = np.bincount(self.train_users, minlength=self.n_users) > 0
        for lab, split_name in ((1, "valid"), (2, "test")):
            sel = labels == lab
            u, i = users[sel], items[sel]
            if self.config.get("filter_out_cod_start_users", True):
                warm = has_train[u]
                u, i = u[warm], i[warm]
            setattr(self, f"{split_name}_matrix", self._csr(u, i, shape))
        self.n_train = int(self.train_users.shape[0])

    @staticmethod
    def _csr(u, i, shape) -> sp.csr_matrix:
        return sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=shape)

    def _read_features(self, path: Path, modality: str) -> np.ndarray:
        feats, problems, _ = read_features(path, self.n_items)
        if problems:
            raise DataError(problems[0])
        return feats

    # ------------------------------------------------------------------------------------------
    def feature_hash(self, modality: str) -> str:
        """SHA-256 of a feature file's bytes (cache keys depend on it)."""
        if modality not in self._feature_hashes:
            h = hashlib.sha256()
            with open(self._feature_paths[modality], "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
            self._feature_hashes[modality] = h.hexdigest()
        return self._feature_hashes[modality]

    @property
    def train_fingerprint(self) -> str:
        """Hash of the training split only (derived artifacts must not depend on valid/test)."""
        if not hasattr(self, "_train_fp"):
            h = hashlib.sha256()
            h.update(np.int64([self.n_users, self.n_items]).tobytes())
            coo = self.train_matrix.tocoo()
            order = np.lexsort((coo.col, coo.row))
            h.update(coo.row[order].astype(np.int64).tobytes())
            h.update(coo.col[order].astype(np.int64).tobytes())
            self._train_fp = h.hexdigest()
        return self._train_fp

    def eval_matrix(self, split: str) -> sp.csr_matrix:
        return {"valid": self.valid_matrix, "test": self.test_matrix}[split]

    def summary(self) -> str:
        return (f"{self.name}: {self.n_users} users, {self.n_items} items, {self.n_train} train / "
                f"{self.valid_matrix.nnz} valid / {self.test_matrix.nnz} test interactions, "
                f"features {', '.join(f'{m}:{f.shape[1]}' for m, f in self.features.items())}")


def _model_uses_features(config) -> bool:
    """False only for a registered model that declares ``uses_features = False`` (BPR, LightGCN)."""
    name = config.get("model")
    if not name:
        return True
    from mmrec.registry import RegistryError, get_model

    try:
        return bool(getattr(get_model(str(name)), "uses_features", True))
    except RegistryError:
        return True


def read_interactions(path: Path, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, x_label) of an .inter file; a DataError naming the row when the header or a value is wrong."""
    sep = cfg.get("field_separator", "\t")
    with open(path) as fh:
        first = fh.readline()
    if not first.strip():
        raise DataError(f"{path} is empty: expected a header line (userID, itemID, x_label, ... separated by "
                        f"field_separator) and one row per interaction")
    header = first.rstrip("\n").split(sep)
    need = [cfg["USER_ID_FIELD"], cfg["ITEM_ID_FIELD"]]
    if cfg.get("split", "x_label") == "x_label":
        need.append(cfg["inter_splitting_label"])
    missing = [c for c in need if c not in header]
    if missing:
        name = cfg["dataset"]
        where = (f"configs/dataset/{name}.yaml" if (CONFIG_DIR / "dataset" / f"{name}.yaml").exists()
                 else f"a new configs/dataset/{name}.yaml or with --set")
        raise DataError(f"{path}: missing column {missing[0]!r} (header has {header}); "
                        f"fix the header or set USER_ID_FIELD / ITEM_ID_FIELD / inter_splitting_label "
                        f"in {where}")
    cols = [header.index(c) for c in need]
    try:
        raw = np.loadtxt(path, delimiter=sep, skiprows=1, usecols=cols, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise DataError(_locate_bad_value(path, sep, need, cols)) from err
    if raw.shape[0] == 0:
        raise DataError(f"{path}: no interactions after the header")
    for j, name in enumerate(need):
        col = raw[:, j]
        bad = np.flatnonzero((col != np.floor(col)) | (col < 0))
        if bad.size:
            raise DataError(f"{path}: column {name!r} row {bad[0] + 2} has {col[bad[0]]!r}; ids and "
                            "labels must be non-negative integers (re-index ids to 0..n-1)")
    users = raw[:, 0].astype(np.int64)
    items = raw[:, 1].astype(np.int64)
    if len(need) == 3:
        labels = raw[:, 2].astype(np.int64)
    else:
        labels = np.zeros_like(users)
    return users, items, labels


def _locate_bad_value(path: Path, sep: str, names: list[str], cols: list[int]) -> str:
    """Error path only: find the first line whose field is not an integer."""
    with open(path) as fh:
        next(fh)
        for line_no, line in enumerate(fh, start=2):
            fields = line.rstrip("\n").split(sep)
            for name, c in zip(names, cols):
                value = fields[c] if c < len(fields) else ""
                try:
                    int(value)
                except ValueError:
                    return (f"{path}: column {name!r} row {line_no} has {value!r}, not an integer; ids "
                            "must be 0-based integers and x_label 0/1/2")
    return f"{path}: could not parse columns {names} as integers"


def interaction_problems(path: Path, users: np.ndarray, items: np.ndarray, labels: np.ndarray,
                         label_name: str = "x_label") -> list[str]:
    """Every problem of an interaction table that would make a run wrong, each naming the file and the fix:
    labels outside 0/1/2, duplicated (user, item) rows within a split, no training rows, and a pair in two
    splits (a leak)."""
    problems = []
    bad = np.flatnonzero((labels < 0) | (labels > 2))
    if bad.size:
        problems.append(f"{path}: column {label_name!r} has {bad.size} value(s) outside 0/1/2, first row "
                        f"{bad[0] + 2} = {labels[bad[0]]}; x_label must be 0 (train), 1 (valid) or 2 (test)")
    n_items = int(items.max()) + 1 if items.size else 1
    keys = users * n_items + items
    first_split: dict[int, int] = {}
    for lab, split_name in ((0, "train"), (1, "valid"), (2, "test")):
        uniq, counts = np.unique(keys[labels == lab], return_counts=True)
        dup = np.flatnonzero(counts > 1)
        if dup.size:
            k = uniq[dup[0]]
            problems.append(f"{path}: the {split_name} split has {int((counts[dup] - 1).sum())} duplicate "
                            f"(user, item) rows, first ({k // n_items}, {k % n_items}); de-duplicate the file")
        first_split[lab] = uniq
    if not (labels == 0).any():
        problems.append(f"{path}: no training interactions (x_label 0); label most rows 0")
    for lab, split_name in ((1, "valid"), (2, "test")):
        both = np.intersect1d(first_split[0], first_split[lab], assume_unique=True)
        if both.size:
            problems.append(f"{path}: {both.size} (user, item) pairs appear in both train and {split_name}, first "
                            f"({both[0] // n_items}, {both[0] % n_items}); each interaction must have one x_label")
    return problems


def read_features(path: Path, n_items: int | None) -> tuple[np.ndarray | None, list[str], dict]:
    """A feature file as float32 [n_items, dim], with every problem (unreadable, not 2-d, a row count other
    than the number of items, NaN or infinite rows) and its statistics (shape, dtype, all-zero rows)."""
    try:
        raw = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        return None, [f"{path}: not a readable .npy array ({err}); save it with numpy.save"], {}
    stats = {"shape": list(raw.shape), "dtype": str(raw.dtype)}
    if raw.ndim != 2:
        return None, [f"{path}: expected a 2-d array (items x dims), got shape {raw.shape}"], stats
    problems = []
    if n_items is not None and raw.shape[0] != n_items:
        problems.append(f"{path}: {raw.shape[0]} rows but the interaction file has {n_items} items (max itemID + 1); "
                        "row i must hold item i's features")
    feats = np.array(raw, dtype=np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(feats).all(axis=1))
    if bad_rows.size:
        problems.append(f"{path}: {bad_rows.size} row(s) have NaN or infinite values, first row {bad_rows[0]} "
                        f"(item {bad_rows[0]}); impute or zero them before use")
    stats["all_zero_rows"] = int((~feats.any(axis=1)).sum()) if not bad_rows.size else None
    return feats, problems, stats


def _check_files(folder: Path, config) -> tuple[Path, dict[str, Path]]:
    """The interaction file and the feature files the model reads, or the DataError naming what is missing."""
    inter_path = folder / (config.get("inter_file_name") or f"{config['dataset']}.inter")
    feature_paths = {m: folder / config[key] for m, key in MODALITIES.items() if config.get(key)}
    if not _model_uses_features(config):  # ID-only models neither need nor load feature files
        feature_paths = {}
    if not folder.is_dir() or not inter_path.exists():
        raise DataError(_missing_message(folder, config))
    for path in feature_paths.values():
        if not path.exists():
            raise DataError(_missing_message(folder, config) + f" Missing: {path.name}.")
    return inter_path, feature_paths


def check_available(config) -> None:
    """The missing-data error a run would stop with, raised without reading any data; a registered
    synthetic preset is generated here, once, before parallel jobs could race to generate it.  Lets a
    comparison over many datasets fail at once."""
    ensure_generated(config)
    _check_files(_resolve_data_dir(config), config)


