"""Deterministic synthetic datasets in MMRec format.

A dataset is written to ``<out_dir>/<name>/``::

    <name>.inter       userID itemID rating timestamp x_label  (tab separated, header)
    image_feat.npy     n_items x image_dim float32, row i = item i
    text_feat.npy      n_items x text_dim  float32, row i = item i
    <name>.yaml        MMRec dataset yaml (field names, file names)
    meta.json          generator version + arguments; a mismatch triggers regeneration

Hidden generative story (see docs/datasets.md):

* every item has a category, a sub-category inside it (the *content* that the
  features see), a hidden "community" group (a purely collaborative factor the
  features never see) and a Zipf popularity;
* every user has a few favourite categories (with a favourite sub-category in
  each) and a couple of hidden communities; each interaction is drawn through
  one of three routes -- content (category -> sub-category -> item by
  popularity), community (group -> item by popularity) or global popularity;
* item features are random projections of a latent vector built from category,
  sub-category and item-specific style, plus per-item / per-modality noise (some
  items get very noisy images or texts), a low-rank nuisance factor unrelated to
  preferences and isotropic high-dimensional noise.  Image features are ReLU'd
  (VGG-like, non-negative), text features are L2-normalised (sentence-encoder
  like).

Everything is vectorised numpy; no loop runs over users or interactions.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mmrec.data.sources import register_generator

GENERATOR_VERSION = 5

# Defaults for the knobs of :func:`generate`.  Presets may override any of them.
DEFAULT_KNOBS = dict(
    n_interactions=None,     # target total; None -> mean_activity * n_users
    mean_activity=8.3,       # mean interactions per user (Amazon 5-core: ~8)
    min_activity=5,          # every user gets at least this many
    activity_tail=2.2,       # Lomax shape of the extra activity (smaller = heavier tail)
    n_categories=None,       # None -> round(0.7 * sqrt(n_items))
    subcats_per_category=5,
    n_groups=None,           # hidden collaborative communities; None -> 3 * n_categories
    pop_alpha=0.65,          # Zipf exponent of item popularity
    p_content=0.55,          # route probabilities (content / community / popularity)
    p_group=0.25,
    p_random=0.05,           # uniformly random item (idiosyncratic noise); rest: popularity
    p_fav_subcat=0.6,        # content route: prob. of the user's favourite sub-category
    latent_dim=48,
    subcat_scale=0.8,        # latent = centroid + subcat_scale*offset + style_scale*style
    style_scale=0.6,
    img_noise=2.5,           # median per-item noise scale (relative to signal)
    txt_noise=1.8,
    noisy_item_frac=0.15,    # fraction of items whose image (resp. text) is very noisy
    noisy_item_factor=4.0,
    nuisance_dim=16,         # low-rank nuisance factor (photo background, boilerplate text)
    nuisance_scale=1.0,
)

PRESETS = {
    "mini": dict(n_users=3000, n_items=1500, image_dim=1024, text_dim=384),
    "baby_synth": dict(n_users=19445, n_items=7050, n_interactions=160792,
                       image_dim=4096, text_dim=384),
    # image_dim 1024 (not 4096) for elec: 63k x 4096 float32 would be 1 GB on disk.
    "elec_synth": dict(n_users=192403, n_items=63001, n_interactions=1689188,
                       image_dim=1024, text_dim=384),
    "tiny": dict(n_users=200, n_items=120, image_dim=64, text_dim=32),
    # the confirmation set for choices tuned on mini: 3x mini's users and items, same sparsity, and a
    # generator seed no tuning run has seen (a preset's "seed" is its default generator seed)
    "mid_synth": dict(n_users=9000, n_items=4500, image_dim=1024, text_dim=384, seed=31),
    # a second confirmation set of the same shape and its own seed: once mid_synth has helped choose a
    # setting, mid_synth_b is the set that setting has never seen
    "mid_synth_b": dict(n_users=9000, n_items=4500, image_dim=1024, text_dim=384, seed=53),
}

TS_START = 1_262_304_000   # 2010-01-01
TS_END = 1_538_352_000     # 2018-10-01


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
class _GroupSampler:
    """Sample an item from a group with probability proportional to a weight."""

    def __init__(self, group_of_item: np.ndarray, weight: np.ndarray, n_groups: int):
        order = np.argsort(group_of_item, kind="stable")
        self.order = order
        w = weight[order].astype(np.float64)
        self.cw = np.cumsum(w)
        counts = np.bincount(group_of_item, minlength=n_groups)
        self.end = np.cumsum(counts)
        self.start = self.end - counts
        before = np.concatenate([[0.0], self.cw])
        self.lo = before[self.start]
        self.tot = before[self.end] - self.lo

    def sample(self, g: np.ndarray, r: np.ndarray) -> np.ndarray:
        t = self.lo[g] + r * self.tot[g]
        idx = np.searchsorted(self.cw, t, side="right")
        idx = np.clip(idx, self.start[g], self.end[g] - 1)
        return self.order[idx]


def _balanced_assign(rng, n: int, k: int) -> np.ndarray:
    """Random assignment of n things to k buckets, every bucket non-empty (n >= k)."""
    a = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    return rng.permutation(a)


def _activity(rng, n_users, n_items, knobs) -> np.ndarray:
    lo = int(knobs["min_activity"])
    cap = max(lo, n_items // 4)
    target = knobs["n_interactions"]
    if target is None:
        target = knobs["mean_activity"] * n_users
    base = rng.pareto(knobs["activity_tail"], n_users)   # Lomax

    def total(s):
        return np.minimum(lo + np.floor(s * base), cap).sum()

    s_lo, s_hi = 0.0, 1.0
    while total(s_hi) < target and s_hi < 1e6:
        s_hi *= 2
    for _ in range(50):
        mid = 0.5 * (s_lo + s_hi)
        if total(mid) < target:
            s_lo = mid
        else:
            s_hi = mid
    return np.minimum(lo + np.floor(s_hi * base), cap).astype(np.int64)


def split_labels(user: np.ndarray, rng) -> np.ndarray:
    """MMRec labelling rule (x_label) applied per user after a random shuffle (the loader's own rule)."""
    from mmrec.data.dataset import mmrec_split_labels

    return mmrec_split_labels(user, rng)


def _move_items_into_train(user, item, label, n_items, rng, rounds=5):
    """Best effort: items that only occur in valid/test swap label with a train
    interaction of the same user whose item occurs in train at least twice.
    Per-user label counts (hence the split rule) are unchanged."""
    for _ in range(rounds):
        tr_cnt = np.bincount(item[label == 0], minlength=n_items)
        bad = np.flatnonzero((label != 0) & (tr_cnt[item] == 0))
        if len(bad) == 0:
            return label
        # one bad interaction per item
        _, first = np.unique(item[bad], return_index=True)
        bad = bad[first]
        donor_ok = (label == 0) & (tr_cnt[item] >= 2)
        don = np.flatnonzero(donor_ok)
        if len(don) == 0:
            return label
        # random donor per user: shuffle then take first per user
        don = don[rng.permutation(len(don))]
        du, dfirst = np.unique(user[don], return_index=True)
        donor_of_user = np.full(int(user.max()) + 1, -1)
        donor_of_user[du] = don[dfirst]
        # one swap per user per round
        bu, bfirst = np.unique(user[bad], return_index=True)
        bad = bad[bfirst]
        d = donor_of_user[user[bad]]
        keep = d >= 0
        bad, d = bad[keep], d[keep]
        # a donor item must not lose its last train copies within this round
        ditem, dcnt = np.unique(item[d], return_counts=True)
        okd = np.ones(len(d), bool)
        over = ditem[tr_cnt[ditem] - dcnt < 1]
        if len(over):
            okd &= ~np.isin(item[d], over)
        bad, d = bad[okd], d[okd]
        label[d], label[bad] = label[bad], 0
    return label


# ----------------------------------------------------------------------------------
# generator
# ----------------------------------------------------------------------------------
def _simulate(n_users, n_items, seed, knobs):
    ss = np.random.SeedSequence(seed)
    r_items, r_users, r_inter, r_feat, r_split = [np.random.default_rng(s) for s in ss.spawn(5)]

    n_cat = knobs["n_categories"] or max(2, int(round(0.7 * np.sqrt(n_items))))
    n_sub = int(knobs["subcats_per_category"])
    n_cat = min(n_cat, max(1, n_items // n_sub))
    n_grp = knobs["n_groups"] or 3 * n_cat
    n_grp = min(n_grp, n_items)

    # ---- items -------------------------------------------------------------------
    subcat = _balanced_assign(r_items, n_items, n_cat * n_sub)     # global sub id
    cat = subcat // n_sub
    group = _balanced_assign(r_items, n_items, n_grp)
    pop = (1.0 + r_items.permutation(n_items)) ** (-knobs["pop_alpha"])
    cat_pop = np.bincount(cat, weights=pop, minlength=n_cat)
    grp_pop = np.bincount(group, weights=pop, minlength=n_grp)

    # ---- users -------------------------------------------------------------------
    K = 4
    n_fav = np.minimum(1 + r_users.poisson(0.8, n_users), K)
    # favourite categories drawn by category popularity (with replacement: fine)
    cp = cat_pop ** 0.5
    cc = np.cumsum(cp / cp.sum())
    ucats = np.minimum(np.searchsorted(cc, r_users.random((n_users, K))), n_cat - 1)
    w = r_users.gamma(0.7, 1.0, (n_users, K)) + 1e-3
    w[np.arange(K)[None, :] >= n_fav[:, None]] = 0.0
    ucw = np.cumsum(w / w.sum(1, keepdims=True), axis=1)
    ufav_sub = r_users.integers(0, n_sub, (n_users, K))
    gp = grp_pop ** 0.5
    gc = np.cumsum(gp / gp.sum())
    ugrps = np.minimum(np.searchsorted(gc, r_users.random((n_users, 2))), n_grp - 1)
    activity = _activity(r_users, n_users, n_items, knobs)

    sub_sampler = _GroupSampler(subcat, pop, n_cat * n_sub)
    grp_sampler = _GroupSampler(group, pop, n_grp)
    glob_cw = np.cumsum(pop)

    def draw(uu):
        m = len(uu)
        route = r_inter.random(m)
        r = r_inter.random(m)
        items = np.empty(m, np.int64)
        pc, pg = knobs["p_content"], knobs["p_group"]
        a = route < pc
        b = (route >= pc) & (route < pc + pg)
        pr = knobs["p_random"]
        c = (route >= pc + pg) & (route < 1.0 - pr)
        d_ = route >= max(pc + pg, 1.0 - pr)
        if d_.any():
            items[d_] = np.minimum((r[d_] * n_items).astype(np.int64), n_items - 1)
        if a.any():
            ua = uu[a]
            slot = (ucw[ua] < r_inter.random(len(ua))[:, None]).sum(1)
            slot = np.minimum(slot, K - 1)
            cat_a = ucats[ua, slot]
            fav = r_inter.random(len(ua)) < knobs["p_fav_subcat"]
            sub = np.where(fav, ufav_sub[ua, slot], r_inter.integers(0, n_sub, len(ua)))
            items[a] = sub_sampler.sample(cat_a * n_sub + sub, r[a])
        if b.any():
            ub = uu[b]
            g = ugrps[ub, r_inter.integers(0, 2, len(ub))]
            items[b] = grp_sampler.sample(g, r[b])
        if c.any():
            t = r[c] * glob_cw[-1]
            items[c] = np.minimum(np.searchsorted(glob_cw, t, side="right"), n_items - 1)
        return items

    # ---- interactions: oversample, drop duplicates, top up the short users ---------
    have_u = np.empty(0, np.int64)
    have_i = np.empty(0, np.int64)
    need = activity.copy()
    for rnd in range(12):
        if need.sum() == 0:
            break
        reps = np.ceil(need * 1.3).astype(np.int64) + 2
        uu = np.repeat(np.arange(n_users), reps)
        ii = draw(uu) if rnd < 10 else r_inter.integers(0, n_items, len(uu))
        all_u = np.concatenate([have_u, uu])
        all_i = np.concatenate([have_i, ii])
        key = all_u * n_items + all_i
        _, first = np.unique(key, return_index=True)
        first.sort()                                   # keep the earliest draw
        all_u, all_i = all_u[first], all_i[first]
        # per user keep at most activity[u]
        order = np.argsort(all_u, kind="stable")
        all_u, all_i = all_u[order], all_i[order]
        cnt = np.bincount(all_u, minlength=n_users)
        starts = np.cumsum(cnt) - cnt
        rank = np.arange(len(all_u)) - starts[all_u]
        keep = rank < activity[all_u]
        have_u, have_i = all_u[keep], all_i[keep]
        need = activity - np.bincount(have_u, minlength=n_users)

    # ---- coverage: every item occurs at least once ----------------------------------
    seen = np.bincount(have_i, minlength=n_items) > 0
    unseen = np.flatnonzero(~seen)
    if len(unseen):
        # give each unseen item to a random user who likes its category (fallback: any)
        flat_c = ucats.ravel()
        flat_u = np.repeat(np.arange(n_users), K)
        valid = (np.arange(K)[None, :] < n_fav[:, None]).ravel()
        flat_c, flat_u = flat_c[valid], flat_u[valid]
        o = np.argsort(flat_c, kind="stable")
        flat_c, flat_u = flat_c[o], flat_u[o]
        cnt = np.bincount(flat_c, minlength=n_cat)
        st = np.cumsum(cnt) - cnt
        ic = cat[unseen]
        rr = r_inter.random(len(unseen))
        pick = st[ic] + np.floor(rr * cnt[ic]).astype(np.int64)
        users_new = np.where(cnt[ic] > 0, flat_u[np.minimum(pick, len(flat_u) - 1)],
                             r_inter.integers(0, n_users, len(unseen)))
        have_u = np.concatenate([have_u, users_new])
        have_i = np.concatenate([have_i, unseen])

    order = np.lexsort((have_i, have_u))
    user, item = have_u[order], have_i[order]

    # ---- split + timestamps ------------------------------------------------------
    label = split_labels(user, r_split)
    label = _move_items_into_train(user, item, label, n_items, r_split)
    ts = r_split.integers(TS_START, TS_END, len(user))

    hidden = dict(cat=cat, subcat=subcat, group=group, pop=pop)
    return user, item, label, ts, hidden, r_feat


def _features(hidden, n_items, image_dim, text_dim, rng, knobs):
    cat, subcat = hidden["cat"], hidden["subcat"]
    n_cat, n_subs = int(cat.max()) + 1, int(subcat.max()) + 1
    d = int(knobs["latent_dim"])
    centroid = rng.standard_normal((n_cat, d))
    sub_off = rng.standard_normal((n_subs, d))
    style = rng.standard_normal((n_items, d))
    z = centroid[cat] + knobs["subcat_scale"] * sub_off[subcat] + knobs["style_scale"] * style
    z /= np.sqrt(1 + knobs["subcat_scale"] ** 2 + knobs["style_scale"] ** 2)
    nd = int(knobs["nuisance_dim"])
    nuis = rng.standard_normal((n_items, nd))

    def modality(dim, noise, f32_post):
        A = rng.standard_normal((d, dim)) / np.sqrt(d)
        B = rng.standard_normal((nd, dim)) / np.sqrt(nd)
        sig = noise * np.exp(0.5 * rng.standard_normal(n_items))        # per-item noise
        noisy = rng.random(n_items) < knobs["noisy_item_frac"]
        sig = np.where(noisy, sig * knobs["noisy_item_factor"], sig)
        bias = rng.standard_normal(dim) * 0.5                             # common offset
        out = np.empty((n_items, dim), np.float32)
        bs = max(1, 2_000_000 // dim)
        for s in range(0, n_items, bs):                                   # blocks: bounded memory
            e = min(n_items, s + bs)
            x = (z[s:e] @ A + knobs["nuisance_scale"] * (nuis[s:e] @ B)
                 + sig[s:e, None] * rng.standard_normal((e - s, dim)) + bias)
            out[s:e] = f32_post(x)
        return out

    def relu(x):
        return np.maximum(x, 0.0).astype(np.float32)

    def l2(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    img = modality(image_dim, knobs["img_noise"], relu)
    txt = modality(text_dim, knobs["txt_noise"], l2)
    return img, txt


def _write_inter(path: Path, user, item, ts, label):
    with open(path, "w", newline="\n") as f:
        f.write("userID\titemID\trating\ttimestamp\tx_label\n")
        bs = 200_000
        for s in range(0, len(user), bs):
            e = min(len(user), s + bs)
            rows = np.stack([user[s:e], item[s:e], ts[s:e], label[s:e]], 1).tolist()
            f.write("".join(f"{u}\t{i}\t5\t{t}\t{l}\n" for u, i, t, l in rows))


def _yaml_text(name: str) -> str:
    return (
        "# Synthetic dataset generated by utils/synth.py (MMRec dataset yaml)\n"
        "USER_ID_FIELD: userID\n"
        "ITEM_ID_FIELD: itemID\n"
        "#RATING_FIELD: rating\n"
        "TIME_FIELD: timestamp\n"
        "\n"
        "filter_out_cod_start_users: True\n"
        "load_cols: [userID, itemID]\n"
        "inter_splitting_label: x_label\n"
        "\n"
        f"inter_file_name: '{name}.inter'\n"
        "\n"
        "# name of features\n"
        "vision_feature_file: 'image_feat.npy'\n"
        "text_feature_file: 'text_feat.npy'\n"
        "user_graph_dict_file: 'user_graph_dict.npy'\n"
        "\n"
        'field_separator: "\\t"\n'
    )


def _meta(name, n_users, n_items, seed, image_dim, text_dim, knobs) -> dict:
    k = dict(DEFAULT_KNOBS)
    k.update(knobs)
    return dict(generator="utils.synth", version=GENERATOR_VERSION, name=name,
                n_users=int(n_users), n_items=int(n_items), seed=int(seed),
                image_dim=int(image_dim), text_dim=int(text_dim), knobs=k)


def generate(out_dir, name, n_users, n_items, seed=0, image_dim=4096, text_dim=384,
             **knobs) -> Path:
    """Generate ``out_dir/name/`` (overwriting it) and return that folder."""
    unknown = set(knobs) - set(DEFAULT_KNOBS)
    if unknown:
        raise TypeError(f"unknown generator knobs: {sorted(unknown)}")
    if n_items < 10 or n_users < 2:
        raise ValueError("need at least 10 items and 2 users")
    meta = _meta(name, n_users, n_items, seed, image_dim, text_dim, knobs)
    k = meta["knobs"]
    folder = Path(out_dir) / name
    tmp = Path(out_dir) / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    user, item, label, ts, hidden, r_feat = _simulate(n_users, n_items, seed, k)
    _write_inter(tmp / f"{name}.inter", user, item, ts, label)
    del user, item, label, ts
    img, txt = _features(hidden, n_items, image_dim, text_dim, r_feat, k)
    np.save(tmp / "image_feat.npy", img)
    del img
    np.save(tmp / "text_feat.npy", txt)
    (tmp / f"{name}.yaml").write_text(_yaml_text(name))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")

    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def preset_args(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown synthetic dataset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])


def ensure_dataset(data_path, name, seed=None, **overrides) -> Path:
    """Generate ``data_path/name`` for a known preset if it is missing or its meta.json
    does not match the current generator; return the folder.  ``seed`` None = the preset's own
    generator seed (0 unless the preset names one)."""
    args = preset_args(name)
    preset_seed = args.pop("seed", 0)
    args.update(overrides)
    return _ensure_args(data_path, name, preset_seed if seed is None else seed, args)


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate a synthetic MMRec-format dataset.")
    p.add_argument("name", help=f"preset ({', '.join(PRESETS)}) or a new name with --users/--items")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--interactions", type=int)
    p.add_argument("--image-dim", type=int)
    p.add_argument("--text-dim", type=int)
    p.add_argument("--seed", type=int, default=None, help="generator seed (default: the preset's, else 0)")
    p.add_argument("--out", default="data")
    p.add_argument("--force", action="store_true", help="regenerate even if up to date")
    a = p.parse_args(argv)
    args = dict(PRESETS.get(a.name, dict(image_dim=4096, text_dim=384)))
    preset_seed = args.pop("seed", 0)
    seed = preset_seed if a.seed is None else a.seed
    for key, val in (("n_users", a.users), ("n_items", a.items), ("n_interactions", a.interactions),
                     ("image_dim", a.image_dim), ("text_dim", a.text_dim)):
        if val is not None:
            args[key] = val
    if "n_users" not in args or "n_items" not in args:
        p.error(f"{a.name!r} is not a preset: give --users and --items")
    t0 = time.time()
    if a.force:
        n_users, n_items = args.pop("n_users"), args.pop("n_items")
        folder = generate(a.out, a.name, n_users, n_items, seed=seed, **args)
    else:
        folder = _ensure_args(a.out, a.name, seed, args)
    print(f"{folder} ready ({time.time() - t0:.1f}s)")
    return 0


def _ensure_args(out, name, seed, args):
    args = dict(args)
    n_users, n_items = args.pop("n_users"), args.pop("n_items")
    image_dim, text_dim = args.pop("image_dim", 4096), args.pop("text_dim", 384)
    folder = Path(out) / name
    want = json.loads(json.dumps(_meta(name, n_users, n_items, seed, image_dim, text_dim, args)))
    files = [folder / f"{name}.inter", folder / "image_feat.npy", folder / "text_feat.npy"]
    try:
        if json.loads((folder / "meta.json").read_text()) == want and all(f.exists() for f in files):
            return folder
    except (OSError, ValueError):
        pass
    return generate(out, name, n_users, n_items, seed=seed, image_dim=image_dim,
                    text_dim=text_dim, **args)


# the loader generates a preset on first use (or after a generator change) through this registration;
# mmrec itself never imports this module
register_generator(PRESETS, lambda data_path, name: ensure_dataset(data_path, name))

if __name__ == "__main__":
    sys.exit(main())
