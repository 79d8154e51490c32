"""The raw Amazon 2014 review files to an MMRec-format dataset (``python main.py prepare amazon ...``).

Inputs (McAuley's Amazon 2014 release, as MMRec's preprocessing used them):

* reviews: gzip, one JSON record per line (``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``);
* meta: gzip, one Python dict literal per line (``asin``, ``title``, ``brand``, ``categories``,
  ``description``); parsed with ``ast.literal_eval``, never ``eval``;
* image features: a binary file repeating a 10-byte ASIN and 4,096 little-endian float32 values.

Steps: stream the reviews (one (user, item) pair kept per user and item, the earliest), k-core filter
to a fixed point (every user and item with at least k interactions), 0-based ids in order of first
appearance (``u_id_mapping.csv``, ``i_id_mapping.csv`` beside the data), MMRec's per-user 8:1:1 split
(``x_label``), image rows from the binary file (items without an image get the mean of the others,
counted in the report), text features of "title brand categories description" from a sentence encoder
(a sentence-transformers model name or local path; ``none`` writes no text features).  Memory holds the
kept interactions and the kept items' texts, never the raw files.
"""
from __future__ import annotations

import ast
import gzip
import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

log = logging.getLogger("mmrec")
ASIN_BYTES = 10
IMAGE_DIM = 4096


def _progress(iterable, desc: str, unit: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a requirement; keep working without the bar anyway
        return iterable
    return tqdm(iterable, desc=desc, unit=unit, mininterval=2.0)


def _gzip_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a gzip text file, blank lines skipped, read as a stream."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                yield line_no, line


def read_reviews(path: Path) -> Iterator[tuple[str, str, float, int]]:
    """(reviewerID, asin, overall, unixReviewTime) per line of a gzip JSON-lines review file."""
    for line_no, line in _gzip_lines(path):
        try:
            rec = json.loads(line)
            yield rec["reviewerID"], rec["asin"], float(rec.get("overall", 0.0)), int(rec.get("unixReviewTime", 0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} line {line_no}: not a review record ({err}); expected JSON with "
                             "reviewerID, asin, overall, unixReviewTime") from None


def read_meta(path: Path, wanted: set[str]) -> Iterator[tuple[str, dict]]:
    """(asin, record) for the wanted items of a gzip meta file of Python dict literals (JSON also parses)."""
    for line_no, line in _gzip_lines(path):
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {line_no}: neither a Python dict literal nor JSON") from None
        if isinstance(rec, dict) and rec.get("asin") in wanted:
            yield rec["asin"], rec


def read_image_features(path: Path, wanted: dict[str, int], dim: int = IMAGE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """Rows [len(wanted), dim] float32 for the wanted ASINs (by their index) and a mask of the rows found."""
    feats = np.zeros((len(wanted), dim), dtype=np.float32)
    found = np.zeros(len(wanted), dtype=bool)
    record = ASIN_BYTES + 4 * dim
    size = Path(path).stat().st_size
    if size % record:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {ASIN_BYTES}-byte ASIN + {dim} float32 "
                         f"records ({record} bytes each)")
    with open(path, "rb") as fh:
        for _ in _progress(range(size // record), "image features", "items"):
            asin = fh.read(ASIN_BYTES).decode("ascii", errors="replace").strip()
            vec = fh.read(4 * dim)
            idx = wanted.get(asin)
            if idx is not None:
                feats[idx] = np.frombuffer(vec, dtype="<f4")
                found[idx] = True
    return feats, found


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Mask of the interactions kept when users and items with fewer than k are removed, repeatedly, until
    every remaining user and item has at least k (a fixed point)."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        u_count = np.bincount(users[keep], minlength=users.max() + 1 if users.size else 0)
        i_count = np.bincount(items[keep], minlength=items.max() + 1 if items.size else 0)
        new = keep & (u_count[users] >= k) & (i_count[items] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def item_text(rec: dict) -> str:
    """title + brand + categories + description, as one string."""
    cats = rec.get("categories") or []
    flat = [c for group in cats for c in (group if isinstance(group, (list, tuple)) else [group])]
    parts = [rec.get("title"), rec.get("brand"), " ".join(map(str, flat)) if flat else None, rec.get("description")]
    return " ".join(str(p).strip() for p in parts if p)


def hashing_encoder(dim: int) -> Callable[[list[str]], np.ndarray]:
    """``--text-model hash:D``: bag of lower-cased words hashed into D buckets, L2-normalised.  No download and
    no extra package; a smoke-test stand-in, far weaker than a sentence encoder (not for reported results)."""
    import hashlib

    def encode(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little") % dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)
    return encode


def text_encoder(spec: str) -> Callable[[list[str]], np.ndarray]:
    """``hash:D`` (the stand-in above) or a sentence-transformers model name / local path."""
    if spec.startswith("hash:"):
        dim = spec.split(":", 1)[1]
        if not dim.isdigit() or int(dim) < 1:
            raise ValueError(f"--text-model {spec}: expected hash:D with D a positive integer")
        return hashing_encoder(int(dim))
    return sentence_encoder(spec)


def sentence_encoder(model: str) -> Callable[[list[str]], np.ndarray]:
    """A sentence-transformers model (a hub name, or a local folder: then no network is tried)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError("text features need sentence-transformers, an optional extra: pip install "
                          "sentence-transformers (or pass --text-model none for a dataset without text)") from None
    local = Path(model).expanduser()
    st = SentenceTransformer(str(local), local_files_only=True) if local.exists() else SentenceTransformer(model)
    return lambda texts: np.asarray(st.encode(texts, batch_size=64, show_progress_bar=True,
                                              convert_to_numpy=True), dtype=np.float32)


def prepare_amazon(reviews: Path, meta: Path | None, image_features: Path | None, out: Path,
                   encoder: Callable[[list[str]], np.ndarray] | None, k: int = 5, split_seed: int = 999,
                   image_dim: int = IMAGE_DIM) -> dict:
    """Write ``out/<name>.inter``, ``image_feat.npy``, ``text_feat.npy`` (when ``encoder``), the id maps and
    ``out/<name>.yaml``; returns the report (counts, items without image or meta)."""
    from mmrec.data.dataset import mmrec_split_labels

    out = Path(out)
    name = out.name
    user_ids: dict[str, int] = {}
    item_ids: dict[str, int] = {}
    rows_u, rows_i, ratings, times = [], [], [], []
    for user, asin, rating, ts in _progress(read_reviews(reviews), "reviews", "reviews"):
        rows_u.append(user_ids.setdefault(user, len(user_ids)))
        rows_i.append(item_ids.setdefault(asin, len(item_ids)))
        ratings.append(rating)
        times.append(ts)
    if not rows_u:
        raise ValueError(f"{reviews}: no reviews")
    u, i = np.asarray(rows_u, np.int64), np.asarray(rows_i, np.int64)
    r, t = np.asarray(ratings, np.float32), np.asarray(times, np.int64)
    # one interaction per (user, item): the earliest review
    order = np.lexsort((np.arange(len(u)), t, i, u))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (u[order][1:] != u[order][:-1]) | (i[order][1:] != i[order][:-1])
    dedup = np.sort(order[first])
    n_raw, n_dups = len(u), len(u) - len(dedup)
    u, i, r, t = u[dedup], i[dedup], r[dedup], t[dedup]
    keep = k_core(u, i, k)
    u, i, r, t = u[keep], i[keep], r[keep], t[keep]
    if not len(u):
        raise ValueError(f"{reviews}: nothing is left after {k}-core filtering")
    # 0-based ids in order of first appearance among the kept interactions
    _, u_first = np.unique(u, return_index=True)
    _, i_first = np.unique(i, return_index=True)
    u_order = np.unique(u)[np.argsort(u_first)]
    i_order = np.unique(i)[np.argsort(i_first)]
    u_new = np.empty(u.max() + 1, np.int64)
    u_new[u_order] = np.arange(len(u_order))
    i_new = np.empty(i.max() + 1, np.int64)
    i_new[i_order] = np.arange(len(i_order))
    u, i = u_new[u], i_new[i]
    user_name = {v: key for key, v in user_ids.items()}
    item_name = {v: key for key, v in item_ids.items()}
    users_out = [user_name[int(x)] for x in u_order]
    items_out = [item_name[int(x)] for x in i_order]
    labels = mmrec_split_labels(u, split_seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.inter", "w") as fh:
        fh.write("userID\titemID\trating\ttimestamp\tx_label\n")
        for row in zip(u.tolist(), i.tolist(), r.tolist(), t.tolist(), labels.tolist()):
            fh.write("%d\t%d\t%g\t%d\t%d\n" % row)
    (out / "u_id_mapping.csv").write_text("user_id\tuserID\n" + "".join(f"{n}\t{j}\n" for j, n in enumerate(users_out)))
    (out / "i_id_mapping.csv").write_text("asin\titemID\n" + "".join(f"{n}\t{j}\n" for j, n in enumerate(items_out)))
    report = {"dataset": name, "raw_reviews": n_raw, "duplicate_pairs_dropped": n_dups, "k_core": k,
              "users": len(users_out), "items": len(items_out), "interactions": int(len(u)),
              "split_counts": {s: int((labels == lab).sum()) for lab, s in ((0, "train"), (1, "valid"), (2, "test"))}}
    index = {a: j for j, a in enumerate(items_out)}
    if image_features is not None:
        feats, found = read_image_features(image_features, index, image_dim)
        if found.any():
            feats[~found] = feats[found].mean(axis=0)
        np.save(out / "image_feat.npy", feats)
        report["items_without_image"] = int((~found).sum())
    if encoder is not None:
        texts = [""] * len(items_out)
        seen = 0
        if meta is not None:
            for asin, rec in _progress(read_meta(meta, set(index)), "meta", "items"):
                texts[index[asin]] = item_text(rec)
                seen += 1
        report["items_without_meta"] = len(items_out) - seen
        text = np.asarray(encoder(texts), dtype=np.float32)
        if text.shape[0] != len(items_out):
            raise ValueError(f"the text encoder returned {text.shape[0]} rows for {len(items_out)} items")
        np.save(out / "text_feat.npy", text)
    yaml_lines = ["# written by `python main.py prepare amazon` (MMRec dataset yaml)",
                  "USER_ID_FIELD: userID", "ITEM_ID_FIELD: itemID", f"inter_file_name: {name}.inter",
                  f"vision_feature_file: {'image_feat.npy' if image_features is not None else 'null'}",
                  f"text_feature_file: {'text_feat.npy' if encoder is not None else 'null'}",
                  "inter_splitting_label: x_label"]
    (out / f"{name}.yaml").write_text("\n".join(yaml_lines) + "\n")
    (out / "prepare_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
