"""MAGNET: Modality-Guided Mixture of Graph Experts with Entropy-Triggered Routing for Multimodal
Recommendation (Dai, Fang, Cai).  Decisions where the paper is silent: MAGNET.md (shared design docs), docs/magnet.md.

Dual-view backbone (Sec. 3.2; graphs in ``models/magnet_graph.py``):
    G_UI = (U + I, E),   G_UIG = (U + I, E + E+),   E+ = top-r content-induced edges per user  (Eqs. 1-3)
    z^v = 1/(L+1) sum_l (D^-1/2 A_v D^-1/2)^l e^(0)   on each view, shared e^(0)               (Eqs. 4-5)
    z = (z^UI + z^UIG) / 2                                                                      (Eq. 6)
Modality cues:  h^m_i = f_m(x^m_i),  h^m_u = mean_{i in I_u} h^m_i                              (Eqs. 7-8)
Triplet experts: r^B = z, r^A = h^A, r^S = h^S;  x_u(w) = sum_m w^m r^m_u                      (Eqs. 9-10)
    s^(e)_ui = phi_e(x_u(w_e), x_i(w_e)),  w_e = P_g(w~^t) from Dom / Bal / Com templates       (Eqs. 11-15)
    (templates: learned, the default, starts each w_e there and trains it as a softmax of logits)
Routing: pi_ui = softmax(Router([z_u; z_i])), Gamma = TopK(pi, K), renormalise over Gamma,
    s_ui = sum_{e in Gamma} pi~_e s^(e)_ui,  y_ui = v^T s_ui                                   (Eqs. 16-21)
Training (Alg. 2): pi_bar = batch mean of pi over positives, H~ = H(pi_bar) / log E, N_eff = e^H;
    counter n (H~ >= H* for W consecutive steps) switches stage 1 -> 2 once                    (Eqs. 22-26)
    L = L_BPR + l_ctr L_ctr + l_cov(H~) L_cov + l_conf(H~) L_conf (+ Adam weight decay)         (Eqs. 27-32)
    L_cov = sum_e (pi_bar_e - 1/E)^2,  L_conf = mean H(pi_ui),  Lin-Ent: l_cov = 1[s=1] l_r (1 - H~),
    l_conf = 1[s=2] l_r H~.
Measured additions to MAGNET.md (docs/magnet.md, "Decisions"), one set for every dataset (the Amazon
blocks of the yaml add only Table 3's values): ``cue_input`` (l2-normalised features into f_m),
``cue_centering`` (catalogue-centred features into a bias-free f_m, so the cues are not one shared
vector), ``expert_init`` (hadamard W_e = I + 0.1 x default init), ``weight_decay_on``, per-group
learning-rate factors (``embedding_lr_scale``, ``head_lr_scale``, ``cue_lr_scale``, applied by the trainer
through ``self.lr_scale``), ``router_grad: detach`` and the load-based switch signal; measured and off by
default: ``cue_init: pca``, ``modality_scale`` (rms / learned), ``embedding_reg``, ``user_cue_target``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mmrec import graph, native
from mmrec.losses import bpr_loss, half_sq, info_nce_both_ways
from mmrec.layers import xavier_tables
from mmrec.recommender import GeneralRecommender
from models.magnet_routing import (SCHEDULES, STAGE_WEIGHTS, StageController, confidence_loss,  # noqa: F401
                                   coverage_loss, entropy, stage_weight_factors)
from models.magnet_graph import (FAMILIES, augmented_matrix, config_induced_edges, sample_fanout, template_pool,
                                 without_pairs)

log = logging.getLogger("mmrec." + __name__)



# ----------------------------------------------------------------------------------------------
# pure functions (tested one by one)
def topk_gates(pi: torch.Tensor, k: int) -> torch.Tensor:
    """Eqs. 18-19: keep the Top-K entries of pi and renormalise them to sum to 1; others 0."""
    vals, idx = pi.topk(k, dim=-1)
    return torch.zeros_like(pi).scatter(-1, idx, vals / vals.sum(-1, keepdim=True))


def topk_softmax_mix(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int, compiled: bool = True) -> torch.Tensor:
    """Eqs. 17-21 over a block of users x items for a router whose logits split into a user and an item
    part, l_e(u, i) = a_eu + b_ei (the linear router): sum_{e in TopK(l)} softmax_TopK(l)_e y_e.

    y [E, U, I] (v^T s^(e) per expert), a [E, U], b [E, I] -> [U, I].  Equal to Eqs. 17-19 (softmax,
    Top-K, renormalise), since the renormalised kept probabilities are the softmax over the kept logits;
    up to float ties.  Works on expert planes (each [U, I] contiguous) and never takes a per-pair exp:
    exp(l_e) = exp(a_eu) exp(b_ei), shifted by the per-user and per-item maxima.  On CPU the same steps
    run fused in a compiled kernel when one can be built (``mmrec.native``; ``compiled=False`` skips it)."""
    if compiled:
        out = native.topk_mix(y, a, b, k)
        if out is not None:
            return out
    logits = a.unsqueeze(2) + b.unsqueeze(1)  # [E, U, I]
    weights = (a - a.amax(0)).exp().unsqueeze(2) * (b - b.amax(0)).exp().unsqueeze(1)
    if k < logits.shape[0]:
        rest = logits.clone()  # the k-th largest logit per pair: drop the current maximum k - 1 times
        for _ in range(k - 1):
            rest.masked_fill_(rest >= rest.amax(0), -torch.inf)
        weights.masked_fill_(logits < rest.amax(0), 0.0)
    total = weights.sum(0)
    out = weights.mul_(y).sum(0).div_(total)
    lost = total <= torch.finfo(total.dtype).tiny  # the shifted exps underflowed: take these pairs directly
    if bool(lost.any()):
        iu, ii = lost.nonzero(as_tuple=True)
        kept, idx = logits[:, iu, ii].T.topk(k, dim=-1)
        out[iu, ii] = (torch.softmax(kept, dim=-1) * y[:, iu, ii].T.gather(-1, idx)).sum(-1)
    return out


def view_contrastive(a_users, b_users, a_items, b_items, tau: float) -> torch.Tensor:
    """Eq. 28: 1/2 [(L_U + L_I)^{a->b} + (L_U + L_I)^{b->a}], in-batch InfoNCE on cosine / tau."""
    return 0.5 * (info_nce_both_ways(a_users, b_users, tau) + info_nce_both_ways(a_items, b_items, tau))


# ----------------------------------------------------------------------------------------------
def template_divergence(centre: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_e KL(centre_e || softmax(logits_e)): how far the learned blends [E, 3] have moved from the templates
    (its gradient in the logits is softmax(logits) - centre)."""
    log_w = torch.log_softmax(logits, dim=-1)
    return (centre * (torch.log(centre) - log_w)).sum()


def _uniform(shape, fan_in: int) -> nn.Parameter:
    """nn.Linear's default initialisation bound 1/sqrt(fan_in), for stacked per-expert weights."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


@torch.no_grad()
def principal_projection_(proj: nn.Linear, feats: torch.Tensor) -> None:
    """``cue_init: pca``: W = the top-d right singular vectors of the features (as fed to f_m, so centred
    under ``cue_centering``) as rows, bias 0; h_i = the item's coordinates on those directions, which keep
    the most feature variance of any d-dim linear map (MAGNET.md: PyTorch's default init is the spec)."""
    d = proj.out_features
    rank = min(feats.shape)
    if d > rank:
        raise ValueError(f"cue_init: pca needs at least embedding_size={d} items and feature dimensions, "
                         f"got features of shape {tuple(feats.shape)}")
    if max(feats.shape) <= 4096:
        directions = torch.linalg.svd(feats.float(), full_matrices=False).Vh[:d]
    else:  # randomised SVD (Halko et al.) on large catalogues
        directions = torch.svd_lowrank(feats.float(), q=min(d + 16, rank), niter=4)[2][:, :d].T
    proj.weight.copy_(directions)
    if proj.bias is not None:
        proj.bias.zero_()


class ExpertHeads(nn.Module):
    """E expert heads phi_e (Eq. 11) with expert-specific parameters, stacked along dim 0.

    ``hadamard``: s = (W_e x_u) * x_i;  ``concat_mlp``: s = W2_e relu(W1_e [x_u; x_i] + b1_e) + b2_e;
    ``hadamard_concat``: their sum.  ``init="identity"``: W_e = I + 0.1 x the default draw, and W2_e, b2_e = 0,
    so every head starts as the plain dot product where it has one and adds nothing else."""

    KINDS = ("hadamard", "concat_mlp", "hadamard_concat")

    def __init__(self, kind: str, n_experts: int, dim: int, init: str = "default"):
        super().__init__()
        if init not in ("default", "identity"):
            raise ValueError(f"unknown expert_init {init!r}; use default or identity")
        if kind not in self.KINDS:
            raise ValueError(f"unknown expert_head {kind!r}; use one of {', '.join(self.KINDS)}")
        self.kind = kind
        self.use_hadamard = kind in ("hadamard", "hadamard_concat")
        self.use_mlp = kind in ("concat_mlp", "hadamard_concat")
        e, d = n_experts, dim
        if self.use_hadamard:
            self.w_had = _uniform((e, d, d), d)  # [E, out, in]
            if init == "identity":  # W_e = I + 0.1 x default init: starts as a dot product (LightGCN-like)
                with torch.no_grad():
                    self.w_had.mul_(0.1).add_(torch.eye(d))
        if self.use_mlp:
            self.w1_user = _uniform((e, d, d), 2 * d)  # [E, in, hidden] (user half of W1)
            self.w1_item = _uniform((e, d, d), 2 * d)
            self.b1 = _uniform((e, d), 2 * d)
            self.w2 = _uniform((e, d, d), d)  # [E, hidden, out]
            self.b2 = _uniform((e, d), d)
            if init == "identity":  # the MLP part starts at 0: hadamard_concat starts as the hadamard head
                with torch.no_grad():
                    self.w2.zero_(), self.b2.zero_()

    def user_side(self, xu: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads' user-only products (W_e x_u; x_u W1_user), computed once for a user's pairs."""
        out = {}
        if self.use_hadamard:
            out["had"] = torch.einsum("efd,bed->bef", self.w_had, xu)
        if self.use_mlp:
            out["mlp"] = torch.einsum("bed,edh->beh", xu, self.w1_user)
        return out

    def pair(self, xu: torch.Tensor, xi: torch.Tensor, user_side: dict | None = None) -> torch.Tensor:
        """Pair representations s^(e) [B, E, d] from x_u, x_i [B, E, d] (``user_side``: ``user_side(xu)``)."""
        side = user_side if user_side is not None else self.user_side(xu)
        out = 0
        if self.use_hadamard:
            out = out + side["had"] * xi
        if self.use_mlp:
            hidden = torch.relu(side["mlp"] + torch.einsum("bed,edh->beh", xi, self.w1_item) + self.b1)
            out = out + torch.einsum("beh,ehf->bef", hidden, self.w2) + self.b2
        return out

    def all_pairs(self, xu: torch.Tensor, xi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """v^T s^(e) for every user x item pair of a block: xu [U, E, d], xi [I, E, d] -> [U, I, E]."""
        out = 0
        if self.use_hadamard:
            wu = torch.einsum("efd,ued->uef", self.w_had, xu) * v
            out = out + torch.einsum("uef,ief->uie", wu, xi)
        if self.use_mlp:
            hu = torch.einsum("ued,edh->ueh", xu, self.w1_user) + self.b1
            hi = torch.einsum("ied,edh->ieh", xi, self.w1_item)
            w2v = torch.einsum("ehf,f->eh", self.w2, v)
            hidden = torch.relu(hu.unsqueeze(1) + hi.unsqueeze(0))  # [U, I, E, h]
            out = out + torch.einsum("uieh,eh->uie", hidden, w2v) + self.b2 @ v
        return out


class Router(nn.Module):
    """pi = softmax(Router(q)) (Eqs. 16-17); ``linear`` or a one-hidden-layer ``mlp``.  The query is Eq. 16's
    q = [z_u; z_i] (``query="concat"``), whose first layer splits into a user half and an item half, so full
    ranking never forms q; or q = z_u * z_i (``query="product"``: a bilinear form per expert for the linear
    router, so the gates condition on the pair and carry no additive item term)."""

    def __init__(self, kind: str, dim: int, n_experts: int, query: str = "concat"):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown router {kind!r}; use linear or mlp")
        self.kind, self.dim, self.product = kind, dim, query == "product"
        self.first = nn.Linear(dim if self.product else 2 * dim, dim if kind == "mlp" else n_experts)
        self.second = nn.Linear(dim, n_experts) if kind == "mlp" else None

    def user_half(self, zu: torch.Tensor) -> torch.Tensor:
        """First-layer pre-activation of the user half of [z_u; z_i], with the bias."""
        return zu @ self.first.weight[:, : self.dim].T + self.first.bias

    def item_half(self, zi: torch.Tensor) -> torch.Tensor:
        """First-layer pre-activation of the item half of [z_u; z_i]."""
        return zi @ self.first.weight[:, self.dim:].T

    def pair(self, zu: torch.Tensor, zi: torch.Tensor) -> torch.Tensor:
        """Logits [B, E] for aligned rows of z_u, z_i."""
        h = self.first(zu * zi if self.product else torch.cat([zu, zi], dim=-1))
        return self.second(torch.relu(h)) if self.second is not None else h

    def all_pairs(self, zu: torch.Tensor, zi: torch.Tensor) -> torch.Tensor:
        """Logits [U, I, E] for every user x item pair of a block."""
        if self.product:
            h = torch.einsum("ud,id,hd->uih", zu, zi, self.first.weight) + self.first.bias
        else:
            h = self.user_half(zu).unsqueeze(1) + self.item_half(zi).unsqueeze(0)
        return self.second(torch.relu(h)) if self.second is not None else h


# ----------------------------------------------------------------------------------------------
class MAGNET(GeneralRecommender):
    """Dual-view graphs (observed and content-induced edges), triplet-template mixture of graph experts over
    graph/image/text channels, and entropy-triggered progressive routing. Paper and equations: this module's
    docstring. Keys it reads (configs/model/MAGNET.yaml): alpha, aux_order, behaviour_residual, beta,
    candidate_popularity_discount, candidate_score, com_eps, cue_bpr, cue_bpr_weight, cue_centering, cue_form,
    cue_init, cue_input, cue_lr_scale, delta, dropout, edge_dropout, embedding_lr_scale, embedding_reg, entropy_smoothing,
    entropy_threshold, expansion_r, expert_head, expert_init, expert_replicas, families, fanout,
    fanout_resample_steps, fixed_switch_epoch, head_lr_scale, head_mlp_lr_scale, induced_edge_scale,
    induced_edge_weight, item_graph_image_weight, item_graph_layers, item_graph_norm, K, knn_k, lambda_ctr, lambda_r,
    modality_scale, moe, n_layers,
    router, router_grad, router_input, router_lr_scale, routing_schedule, routing_trace_every, seed,
    similarity_smoothing, similarity_whitening, smoothing_steps,
    stage1_min_steps, stage_weights, switch_signal, switch_unit, target_edges, tau, template_lr_scale, template_prior,
    templates, trigger_window,
    user_cue_target,
    view, view_fusion, view_share, weight_decay_on."""
    needs_both_modalities = True  # image and text features, checked before any data is loaded
    #: the stage controller's buffers were ctl_* on the model before it became its own module
    renamed_parameters = {**GeneralRecommender.renamed_parameters, "ctl_": "controller."}
    #: elements of one [users x items x experts (x hidden)] scoring block in full ranking
    score_block_budget = 1 << 22
    #: full ranking on CPU in blocks of RANKING_USERS x RANKING_ITEMS pairs: a block's expert scores
    #: [E, users, items] (~2.4 MB at E = 9) stay in cache between the product and the mixing kernel
    RANKING_USERS, RANKING_ITEMS = 128, 512
    #: every key's allowed values, in one place (checked before any data is loaded; docs/magnet.md)
    config_schema = {
        "view": ("in", ("DV", "SV")), "knn_k": (">=", 1), "expansion_r": (">=", 1),
        "view_fusion": ("in", ("mean", "degree_gate", "per_expert")), "view_share": ("between", (0, 1)),
        "candidate_score": ("in", ("pool_dense", "topk_sparse")),
        "induced_edge_weight": ("in", ("binary", "score")),
        "induced_edge_scale": (">", 0), "candidate_popularity_discount": (">=", 0),
        "fanout": (">=", 0), "fanout_resample_steps": (">=", 0), "edge_dropout": ("between", (0, 0.99)),
        "target_edges": ("in", ("keep", "drop")),
        "cue_input": ("in", ("raw", "l2", "knn")), "cue_init": ("in", ("default", "pca")),
        "cue_form": ("in", ("projection", "purified_knn")),
        "modality_scale": ("in", ("none", "rms", "learned")), "user_cue_target": ("in", ("keep", "exclude")),
        "cue_bpr": ("in", ("none", "cue", "behaviour")), "cue_bpr_weight": (">=", 0),
        "item_graph_layers": (">=", 0), "item_graph_image_weight": ("between", (0, 1)),
        "item_graph_norm": ("in", ("none", "l2")),
        "behaviour_residual": (">=", 0),
        "templates": ("in", ("fixed", "free", "learned")), "families": ("subset", FAMILIES),
        "expert_replicas": (">=", 1),
        "alpha": ("between", (0, 1)), "beta": ("between", (0, 1)), "delta": ("between", (0, 1)),
        "com_eps": ("between", (0, 1)), "aux_order": ("in", ("global", "cyclic")),
        "expert_head": ("in", ExpertHeads.KINDS), "expert_init": ("in", ("default", "identity")),
        "router": ("in", ("linear", "mlp")), "router_grad": ("in", ("full", "detach")), "K": (">=", 1),
        "router_input": ("in", ("raw", "l2", "user", "product")),
        "dropout": ("between", (0, 0.99)),
        "routing_schedule": ("in", SCHEDULES), "stage_weights": ("in", STAGE_WEIGHTS),
        "entropy_threshold": (">=", 0), "trigger_window": (">=", 1), "lambda_r": (">=", 0),
        "switch_signal": ("in", ("dense", "topk_load")), "entropy_smoothing": ("in", ("none", "window", "ema")),
        "smoothing_steps": (">=", 1), "switch_unit": ("in", ("step", "epoch")), "stage1_min_steps": (">=", 0),
        "fixed_switch_epoch": (">=", 0), "lambda_ctr": (">=", 0), "tau": (">", 0), "embedding_reg": (">=", 0),
        "weight_decay_on": ("in", ("all", "non_embedding")),
        "embedding_lr_scale": (">=", 0), "routing_trace_every": (">=", 0), "head_lr_scale": (">=", 0),
        "head_mlp_lr_scale": (">=", 0), "cue_lr_scale": (">=", 0), "router_lr_scale": (">=", 0),
        "template_lr_scale": (">=", 0), "template_prior": (">=", 0),
    }

    @classmethod
    def check_config(cls, config) -> None:
        """K experts are routed out of E = 3 |families| p (Sec. 4.8): K <= E."""
        if config["moe"]:
            n_experts = 3 * len(config["families"]) * int(config["expert_replicas"])
            if int(config["K"]) > n_experts:
                raise ValueError(f"K={config['K']} must lie in 1..E, but the expert pool has E={n_experts} experts "
                                 f"(families={list(config['families'])}, expert_replicas={config['expert_replicas']});"
                                 f" lower K or add families/replicas")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        cfg = config
        d = self.embedding_size
        self.n_layers = int(cfg["n_layers"])
        self.view = str(cfg["view"])
        # view_fusion (an extension of Eq. 6): mean = the paper's 0.5 (z^UI + z^UIG); degree_gate = per node
        # z = z^UI + a (z^UIG - z^UI), a = sigmoid(w_s log(1 + deg) + b_s) with (w_s, b_s) per side (users,
        # items), learned from a = 0.5: nodes with many observed edges can lean on the interaction view and
        # rarely seen ones on the induced edges (docs/magnet.md, "Where MAGNET loses")
        self.view_fusion = str(cfg.get("view_fusion", "mean"))
        # view_share a (with view_fusion: mean): z = (1 - a) z^UI + a z^UIG; a = 0.5 is Eq. 6's mean
        self.view_share = float(cfg.get("view_share", 0.5))
        self.use_moe = bool(cfg["moe"])
        self.fanout = int(cfg["fanout"])
        self.fanout_resample_steps = int(cfg["fanout_resample_steps"])
        # edge_dropout p (an extension, FREEDOM's degree-sensitive pruning): each training epoch propagates
        # over G_UI and G_UIG built from a (1 - p) sample of the observed edges (E+ kept whole), so a training
        # pair's own edge is absent from its propagation with probability ~p, as a held-out pair's always is
        # (redrawn every fanout_resample_steps steps when that is set)
        self.edge_dropout = float(cfg.get("edge_dropout", 0.0))
        if self.edge_dropout > 0 and self.fanout > 0:
            raise ValueError("edge_dropout and fanout both resample the training graphs; set one of them to 0")
        # target_edges drop (an extension): in training, each batch's positive pairs leave G_UI and G_UIG (after
        # the fanout sample, if any), so a scored pair never propagates over its own edge, as a held-out pair
        # cannot; keep = Eqs. 4-5 over every observed edge
        self.target_edges = str(cfg.get("target_edges", "keep"))
        if self.target_edges == "drop" and self.edge_dropout > 0:
            raise ValueError("target_edges: drop works on the full graphs or with fanout, not with edge_dropout; "
                             "set edge_dropout to 0")
        self.seed = int(cfg["seed"])
        self.lambda_ctr = float(cfg["lambda_ctr"])
        # Eq. 32's lambda ||Theta||^2 on the ID rows of the batch (MMRec's reading for ID tables; the coupled
        # Adam decay of `weight_decay` would pull every absent row to 0 at full step size)
        self.embedding_reg = float(cfg["embedding_reg"])
        self.tau = float(cfg["tau"])
        self.lambda_r = float(cfg["lambda_r"])
        self.schedule = str(cfg["routing_schedule"])
        self.stage_weights = str(cfg["stage_weights"])
        self.h_star = float(cfg["entropy_threshold"])
        self.window = int(cfg["trigger_window"])
        self.switch_signal = str(cfg["switch_signal"])
        self.smoothing = str(cfg["entropy_smoothing"])
        self.smoothing_steps = int(cfg["smoothing_steps"])
        self.switch_unit = str(cfg["switch_unit"])
        self.stage1_min_steps = int(cfg["stage1_min_steps"])
        self.fixed_switch_epoch = int(cfg["fixed_switch_epoch"])

        # shared ID embeddings e^(0) (Xavier-uniform, MMRec's convention)
        self.user_embedding, self.item_embedding = xavier_tables(self.n_users, self.n_items, dim=d)
        if str(cfg["weight_decay_on"]) == "non_embedding":  # ID tables learn under Adam without the
            self.no_weight_decay = ("user_embedding", "item_embedding")  # decay pulling absent rows to 0
        # per-group learning-rate factors (docs/magnet.md): the ID path enters every expert scaled by its
        # template weight w^B (Eq. 10), so under Adam it learns w^B-times slower than LightGCN's dot product
        # (the trainer takes the first matching prefix: the MLP part of a head before the heads' own factor)
        groups = (("embedding_lr_scale", ("user_embedding", "item_embedding")),
                  ("head_mlp_lr_scale", ("heads.w1_", "heads.b1", "heads.w2", "heads.b2")),
                  ("head_lr_scale", ("heads", "score_vector")),
                  ("cue_lr_scale", ("image_proj", "text_proj")),
                  ("router_lr_scale", ("router.",)),
                  ("template_lr_scale", ("template_logits",)))
        factor = {key: float(cfg[key]) for key, _ in groups}
        # the MLP part's factor is relative to the heads': its output sums d x d parameters that Adam moves alike
        factor["head_mlp_lr_scale"] *= factor["head_lr_scale"]
        self.lr_scale = {prefix: factor[key] for key, prefixes in groups for prefix in prefixes}
        self._build_views(cfg)

        # modality cues (Eqs. 7-8): f_m linear; user cue = row-normalised R_train times H^m
        self.cue_input = str(cfg["cue_input"])
        if self.cue_input in ("l2", "knn"):  # row-normalised features into f_m (raw features keep their scale)
            self.v_feat, self.t_feat = graph.l2_normalize_rows(self.v_feat), graph.l2_normalize_rows(self.t_feat)
        if self.cue_input == "knn":  # each item's features averaged with its Eq. 1 neighbours N^m(i)
            self.v_feat = self._neighbourhood_mean(self.v_feat, "v", int(cfg["knn_k"]))
            self.t_feat = self._neighbourhood_mean(self.t_feat, "t", int(cfg["knn_k"]))
        # cue_centering: f_m sees features minus the catalogue mean and has no bias, i.e. the cues are
        # centred (item mean of h^m = 0): without it f_m learns the shared mean direction and every cue is
        # nearly one constant vector (issue #11's review; docs/magnet.md)
        self.cue_centering = bool(cfg["cue_centering"])
        if self.cue_centering:
            self.v_feat = self.v_feat - self.v_feat.mean(0, keepdim=True)
            self.t_feat = self.t_feat - self.t_feat.mean(0, keepdim=True)
        self.image_proj = nn.Linear(self.v_feat.shape[1], d, bias=not self.cue_centering)
        self.text_proj = nn.Linear(self.t_feat.shape[1], d, bias=not self.cue_centering)
        self.cue_init = str(cfg["cue_init"])
        if self.cue_init == "pca":  # f_m starts as the projection on the top-d principal directions of its input
            for proj, feats in ((self.image_proj, self.v_feat), (self.text_proj, self.t_feat)):
                principal_projection_(proj, feats)
        # cue_form (f_m's form, left open by the paper): projection = Eq. 7 as written, h^m_i = f_m(x^m_i);
        # purified_knn = h^m_i = sum_j S^m_ij (e_j * sigmoid(f_m(x^m_j))): the item's ID embedding gated by its
        # content and smoothed over the modality's kNN graph S^m (KNN-SIM, k = knn_k, the item among its own
        # neighbours): MGCN's purifier and item-item view, the content use of the strongest baselines
        self.cue_form = str(cfg.get("cue_form", "projection"))
        if self.cue_form == "purified_knn":
            k = int(cfg["knn_k"])
            self.cue_graphs = {m: self.item_knn(m, k, "sim") for m in ("v", "t")}
        coo = self.train_matrix.tocoo()
        deg = np.asarray(self.train_matrix.sum(axis=1)).ravel()
        vals = 1.0 / np.maximum(deg[coo.row], 1.0)
        self.user_history_mean = graph.sparse_from_edges(coo.row, coo.col, vals, (self.n_users, self.n_items),
                                                         self.device)
        self.cue_target = str(cfg["user_cue_target"])
        self.cue_bpr, self.cue_bpr_weight = str(cfg["cue_bpr"]), float(cfg["cue_bpr_weight"])
        # behaviour_residual beta > 0 (an extension, not in the paper): y_ui = Eq. 21 + beta <z_u, z_i>, the
        # graph embeddings' dot product kept at its own weight beside the mixture of experts, as MGCN and
        # SMORE keep their LightGCN term (issue #11: inside the experts it has an effective weight ~0.3)
        self.behaviour_residual = float(cfg.get("behaviour_residual", 0.0) or 0.0)
        # item_graph_layers L > 0 (an extension, not in the paper): the items' behaviour representation gains
        # S^L e_i, the ID embeddings smoothed over the frozen modality kNN graph S = w S_v + (1 - w) S_t
        # (FREEDOM's item-item branch; KNN-BIN, k = knn_k, w = item_graph_image_weight); item_graph_norm l2
        # adds it row-normalised, S^L e_i / |S^L e_i| (LATTICE's form: a unit-norm content term)
        self.item_graph_layers = int(cfg.get("item_graph_layers", 0) or 0)
        self.item_graph_norm = str(cfg.get("item_graph_norm", "none"))
        self.item_graph = None
        if self.item_graph_layers > 0:
            w, k = float(cfg.get("item_graph_image_weight", 0.1)), int(cfg["knn_k"])
            knn = {m: self.item_knn_matrix(m, k, "bin", True, graph.DEGREE_EPS) for m in ("v", "t")}
            self.item_graph = graph.to_torch_sparse(w * knn["v"] + (1.0 - w) * knn["t"], self.device)
        self.register_buffer("user_degree", torch.as_tensor(deg, dtype=torch.float32), persistent=False)
        if self.view_fusion == "degree_gate" and self.view == "DV":  # log(1 + deg) of users, then items
            node_degree = np.concatenate([deg, np.asarray(self.train_matrix.sum(axis=0)).ravel()])
            self.register_buffer("node_log_degree", torch.log1p(torch.as_tensor(node_degree, dtype=torch.float32)),
                                 persistent=False)
            self.fusion_slope, self.fusion_bias = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
        # modality_scale: rms = r^A and r^S rescaled to r^B's RMS row norm before the templates (Eq. 10), so
        # a template weight is the share it claims (issue #11: |z| ~ 3 against |h^m| ~ 0.4 after training)
        # learned = a trainable gain exp(s_m) on r^A and r^S (s_m = 0 at the start, normal learning rate):
        # the model chooses how much weight the cue channels carry against z
        self.modality_scale = str(cfg["modality_scale"])
        if self.modality_scale == "learned":
            self.cue_log_gain = nn.Parameter(torch.zeros(2))

        # expert pool (Eqs. 12-15)
        if self.use_moe:
            weights, self.expert_names = template_pool(
                float(cfg["alpha"]), float(cfg["beta"]), float(cfg["delta"]), float(cfg["com_eps"]),
                str(cfg["aux_order"]), list(cfg["families"]), int(cfg["expert_replicas"]))
        else:  # "w/o MoE Fusion": one head on the plain mean of B, A, S
            weights, self.expert_names = np.full((1, 3), 1.0 / 3.0, dtype=np.float32), ["Mean"]
        self.n_experts = weights.shape[0]
        self.top_k = int(cfg["K"]) if self.use_moe else 1
        self.templates = str(cfg["templates"])
        if self.templates == "fixed" or not self.use_moe:
            self.register_buffer("template_weights", torch.from_numpy(weights))
        elif self.templates == "free":  # "w/o Templates": each expert learns its own softmax mixture from uniform
            self.template_logits = nn.Parameter(torch.zeros(self.n_experts, 3))
        else:  # learned (extension): the same softmax mixtures, starting at the paper's templates (logits = log w_e)
            self.template_logits = nn.Parameter(torch.log(torch.from_numpy(weights)))
        # template_prior lambda_t (extension): the learned blends carry a prior centred on the paper's templates,
        # lambda_t KL(w_e^tpl || w_e) summed over experts; written per training interaction (the loss is a batch
        # mean) it enters as lambda_t / |R| (MAP with one prior for the whole data), so the blends stay near the
        # templates on a small catalogue and follow the data where it has many interactions (not read by
        # templates fixed / free or moe false, so `--set templates=fixed` alone gives the paper's blends)
        self.template_prior = float(cfg["template_prior"]) / max(int(self.train_matrix.nnz), 1) \
            if self.templates == "learned" and self.use_moe else 0.0
        if self.template_prior > 0:
            self.register_buffer("template_centre", torch.from_numpy(weights))
        self.heads = ExpertHeads(str(cfg["expert_head"]), self.n_experts, d, str(cfg["expert_init"]))
        # router_input l2: q = [z_u / |z_u|; z_i / |z_i|], so the gates read directions, not norms: with raw z
        # the item half can key on |z_i| (which grows with popularity) and route tail items to experts with
        # a small behaviour share, whose scores are near 0 (docs/magnet.md); user: q = [z_u; 0], one mixture
        # per user, so the gates cannot rank items at all; product: q = z_u * z_i, gates conditioned on the pair
        self.router_input = str(cfg.get("router_input", "raw"))
        self.router = Router(str(cfg["router"]), d, self.n_experts,
                             "product" if self.router_input == "product" else "concat") if self.use_moe else None
        self.router_grad = str(cfg["router_grad"])
        self.score_vector = nn.Parameter(torch.ones(d))  # Eq. 21: y = v^T s, v initialised to ones
        # view_fusion per_expert (an extension): expert e reads the behaviour channel as
        # z^UI + a_e (z^UIG - z^UI) with its own learnable share a_e = sigmoid(t_e), t_e starting at logit(view_share),
        # so the router can send a pair to experts that lean on the interaction view or on the induced one
        self.per_expert_view = self.view_fusion == "per_expert" and self.view == "DV"
        if self.per_expert_view:
            if self.cue_bpr != "none" or self.cue_target != "keep" or self.modality_scale != "none":
                raise ValueError("view_fusion: per_expert (the default) works with cue_bpr: none, user_cue_target: "
                                 "keep and modality_scale: none; add --set view_fusion=mean to use the others")
            share = min(max(self.view_share, 1e-4), 1 - 1e-4)
            self.expert_view_logit = nn.Parameter(torch.full((self.n_experts,), math.log(share / (1 - share))))
        self.expert_dropout = nn.Dropout(float(cfg["dropout"]))
        self._sampled_views: dict = {}
        self._observed_edges: tuple[torch.Tensor, torch.Tensor] | None = None  # edge_dropout's edge list, built once
        self._train_encodes = 0  # training forwards this epoch (fanout resampling counts them)
        self._init_controller()
        self.trace_every = int(cfg["routing_trace_every"])
        self._trace: list[dict] = []
        self.to(self.device)

    # -- graphs (Sec. 3.2) ----------------------------------------------------------------------
    def _neighbourhood_mean(self, feats: torch.Tensor, modality: str, k: int) -> torch.Tensor:
        """``cue_input: knn``: x~_i = mean of x_j over {i} and i's k cosine neighbours N^m(i) (Eq. 1's lists,
        the ones E+ is built from), so f_m reads an item's modality neighbourhood rather than its own noisy
        feature row."""
        idx, _ = self.item_knn_lists(modality, k, include_self=False)
        return graph.neighbourhood_mean(feats, idx)

    def _build_views(self, cfg) -> None:
        self.adj_ui_cpu = graph.to_torch_sparse(graph.norm_adjacency(self.train_matrix, "sym"))
        self.adj_ui = self.adj_ui_cpu.to(self.device)
        self.adj_uig = self.adj_uig_cpu = None
        self.graph_stats: dict = {"view": self.view}
        self.augment = None  # observed edges -> G_UIG's user-item matrix (observed + E+)
        if self.view == "SV":
            return
        r = int(cfg["expansion_r"])
        induced = config_induced_edges(self.dataset, cfg)
        self.augment = lambda observed: augmented_matrix(observed, induced, str(cfg["induced_edge_weight"]),
                                                         float(cfg["induced_edge_scale"]))
        aug = self.augment(self.train_matrix)
        self.adj_uig_cpu = graph.to_torch_sparse(graph.norm_adjacency(aug, "sym"))  # neighbour sampling reads it
        self.adj_uig = self.adj_uig_cpu.to(self.device)
        n_plus = int(induced["users"].size)
        pools = induced["pool_sizes"]
        self.graph_stats.update({
            "n_induced_edges": n_plus, "n_observed_edges": int(self.train_matrix.nnz),
            "induced_share": round(n_plus / max(n_plus + self.train_matrix.nnz, 1), 4),
            "share_users_pool_below_r": round(float((pools < r).mean()), 4),
            "mean_pool_size": round(float(pools.mean()), 2)})
        log.info("MAGNET G_UIG: |E+| = %d induced + %d observed edges (%.1f%% induced); %.1f%% of users have "
                 "a pool smaller than r=%d (mean pool %.1f)", n_plus, self.train_matrix.nnz,
                 100 * self.graph_stats["induced_share"], 100 * self.graph_stats["share_users_pool_below_r"],
                 r, self.graph_stats["mean_pool_size"])

    # -- controller state (Sec. 3.4), in buffers so checkpoints carry it -------------------------
    def _init_controller(self) -> None:
        self.controller = StageController(self.schedule, self.h_star, self.window, self.smoothing, self.smoothing_steps,
                                          self.switch_unit, self.stage1_min_steps, self.fixed_switch_epoch,
                                          self.stage_weights, self.lambda_r)
        self.register_buffer("sample_epoch", torch.tensor(0, dtype=torch.long))  # epochs begun (fanout seed)
        self._reset_epoch_stats()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "sample_epoch", torch.tensor(0))  # checkpoints from before fanout seeding
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _reset_epoch_stats(self) -> None:
        self._stats = {"h_norm": 0.0, "n_eff": 0.0, "signal": 0.0, "max_load": 0.0, "top1_share": 0.0,
                       "w_cov": 0.0, "w_conf": 0.0, "steps": 0}

    def pre_epoch_processing(self) -> None:
        """Start a new epoch: the controller counts the finished one (Alg. 2); neighbour samples are redrawn."""
        if self.training:
            self.sample_epoch += 1
            self._train_encodes = 0
            self.controller.close_epoch()
        self._reset_epoch_stats()

    # -- forward ---------------------------------------------------------------------------------
    def views(self, held_out: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> dict[str, list[torch.Tensor] | torch.Tensor | None]:
        """The propagation matrices of G_UI and G_UIG: the full graphs, or in training with ``fanout`` F > 0
        a neighbour sample per layer (Eq. 4), redrawn once per epoch (or every ``fanout_resample_steps``
        steps) from a seed of (seed, epoch, draw), so a resumed run draws the same samples; with
        ``target_edges: drop`` the training batch's positive edges ``held_out`` = (users, items) are taken out
        of them."""
        if self.training and self.edge_dropout > 0:
            return self._pruned_views()
        held_out = held_out if self.training and self.target_edges == "drop" else None
        if not (self.training and self.fanout > 0) and held_out is None:
            return {"ui": self.adj_ui, "uig": self.adj_uig}
        key = (int(self.sample_epoch), self._draw_index() if self.fanout > 0 else 0)
        if self._sampled_views.get("key") != key:
            rng = np.random.default_rng([self.seed, *key])
            layers = {name: None if adj is None else (
                [sample_fanout(graph.scipy_csr(adj), self.fanout, rng) for _ in range(self.n_layers)]
                if self.fanout > 0 else [graph.scipy_csr(adj)] * self.n_layers)
                for name, adj in (("ui", self.adj_ui_cpu), ("uig", self.adj_uig_cpu))}
            self._sampled_views = {"key": key, "layers": layers, **({} if self.fanout == 0 else {
                name: None if mats is None else [graph.csr_operator(m, self.device) for m in mats]
                for name, mats in layers.items()})}  # (full graphs without a hold-out: adj_ui, adj_uig)
        if held_out is None:
            return {"ui": self._sampled_views["ui"], "uig": self._sampled_views["uig"]}
        users, items = (t.cpu().numpy() for t in held_out)
        cut: dict[int, torch.Tensor] = {}  # one cut per distinct matrix (the full graph serves every layer)
        for mats in self._sampled_views["layers"].values():
            for m in mats or []:
                if id(m) not in cut:
                    cut[id(m)] = graph.csr_operator(without_pairs(m, users, items, self.n_users), self.device)
        return {name: None if mats is None else [cut[id(m)] for m in mats]
                for name, mats in self._sampled_views["layers"].items()}

    def _draw_index(self) -> int:
        """Which draw of the epoch the training graphs come from (``fanout_resample_steps``; 0: one per epoch)."""
        return self._train_encodes // self.fanout_resample_steps if self.fanout_resample_steps else 0

    def _pruned_views(self) -> dict[str, torch.Tensor | None]:
        """``edge_dropout``: G_UI and G_UIG over a degree-sensitive sample of the observed edges, drawn once per
        epoch or every ``fanout_resample_steps`` steps (``graph.degree_sensitive_keep``, seeded by (seed, epoch,
        draw), so a resumed run draws the same graphs),
        each re-normalised with the kept edges' degrees; E+ is added whole to G_UIG."""
        key = ("pruned", int(self.sample_epoch), self._draw_index())
        if self._sampled_views.get("key") != key:
            if self._observed_edges is None:  # (users, items) of the observed edges, in a fixed order
                observed = self.train_matrix.tocoo()
                self._observed_edges = (torch.from_numpy(observed.row.astype(np.int64)),
                                        torch.from_numpy(observed.col.astype(np.int64)))
            users, items = self._observed_edges
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, *key[1:]]).generate_state(1)[0]))
            keep = graph.degree_sensitive_keep(users, items, self.n_users, self.n_items, self.edge_dropout, generator)
            kept = sp.csr_matrix((np.ones(keep.numel(), dtype=np.float32), (users[keep].numpy(), items[keep].numpy())),
                                 shape=self.train_matrix.shape)
            self._sampled_views = {"key": key, "ui": graph.csr_operator(graph.norm_adjacency(kept, "sym"), self.device),
                                   "uig": None if self.augment is None else graph.csr_operator(
                                       graph.norm_adjacency(self.augment(kept), "sym"), self.device)}
        return self._sampled_views

    def encode(self, users: torch.Tensor | None = None, items: torch.Tensor | None = None,
               held_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Backbone (Eqs. 4-6) and modality cues (Eqs. 7-8) for the given users and items (all when None).

        Rows come in the order given: node tables (``z*``) hold the users, then the items; ``r_user`` /
        ``r_item`` the users / the items.  A training batch asks for its own users and items only: the last
        propagation layer and the cues are then computed for those rows alone (``graph.propagate`` with
        ``rows``; f_m is linear, so a user's cue is f_m of the mean raw feature of its history), equal to
        the full computation restricted to those rows.  ``held_out``: the training batch's (users, positives),
        whose edges leave the graphs under ``target_edges: drop``."""
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight], dim=0)
        rows = None if users is None else torch.cat([users, items + self.n_users])
        views = self.views(held_out)
        if self.training:
            self._train_encodes += 1
        z_ui = graph.propagate(views["ui"], ego, self.n_layers, rows=rows)  # Eq. 5
        out = {"z_ui": z_ui, "z_uig": None, "z": z_ui, "n_users": self.n_users if users is None else users.numel()}
        if views["uig"] is not None:
            z_uig = graph.propagate(views["uig"], ego, self.n_layers, rows=rows)
            # Eq. 6 (view_share 0.5: the mean, exactly); view_fusion degree_gate: a per node
            a = self.fusion_share(rows).unsqueeze(1) if hasattr(self, "fusion_slope") else self.view_share
            out.update(z_uig=z_uig, z=(1.0 - a) * z_ui + a * z_uig)
        if self.item_graph is not None:  # item_graph_layers: z_i + S^L e_i (the extension above)
            n_u = self.n_users if users is None else users.numel()
            smoothed = graph.propagate(self.item_graph, self.item_embedding.weight, self.item_graph_layers, "last",
                                       rows=items)
            if self.item_graph_norm == "l2":
                smoothed = F.normalize(smoothed, dim=-1)
            out["z"] = torch.cat([out["z"][:n_u], out["z"][n_u:] + smoothed])
        h_item_a, h_user_a = self._cues(self.image_proj, self.v_feat, users, items, "v")  # Eqs. 7-8
        h_item_s, h_user_s = self._cues(self.text_proj, self.t_feat, users, items, "t")
        z, n_u = out["z"], out["n_users"]
        # router input q = [z_u; z_i] (Eq. 16); `router_grad: detach` stops the routing path's gradient into z
        z_router = z.detach() if self.router_grad == "detach" else z
        if self.router_input == "l2":
            z_router = F.normalize(z_router, dim=-1)
        elif self.router_input == "user":
            z_router = torch.cat([z_router[:n_u], torch.zeros_like(z_router[n_u:])])
        out["z_router"] = z_router
        if self.per_expert_view:  # [z^UI, z^UIG, h^A, h^S]: each expert mixes the two views itself
            z_ui, z_uig = out["z_ui"], out["z_uig"]
            r_user = torch.stack([z_ui[:n_u], z_uig[:n_u], h_user_a, h_user_s], dim=1)
            r_item = torch.stack([z_ui[n_u:], z_uig[n_u:], h_item_a, h_item_s], dim=1)
        else:
            r_user = torch.stack([z[:n_u], h_user_a, h_user_s], dim=1)  # Eq. 9: [U, 3, d]
            r_item = torch.stack([z[n_u:], h_item_a, h_item_s], dim=1)
        if self.modality_scale != "none":
            factor = (self.modality_factors(torch.cat([r_user, r_item])) if self.modality_scale == "rms"
                      else torch.cat([self.cue_log_gain.new_zeros(1), self.cue_log_gain]).exp().view(1, 3, 1))
            r_user, r_item = r_user * factor, r_item * factor
        out["r_user"], out["r_item"] = r_user, r_item
        return out

    def fusion_share(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``view_fusion: degree_gate``: the weight a of z^UIG per node (all, or the given node rows)."""
        nodes = torch.arange(self.node_log_degree.numel(), device=self.node_log_degree.device) if rows is None else rows
        side = (nodes >= self.n_users).long()  # 0: users, 1: items
        return torch.sigmoid(self.fusion_slope[side] * self.node_log_degree[nodes] + self.fusion_bias[side])

    @staticmethod
    def modality_factors(reps: torch.Tensor) -> torch.Tensor:
        """``modality_scale: rms``: per-channel factors [1, 3, 1] = rho_B / rho_m, rho_m = sqrt(mean over the
        rows of |r^m|^2) over the rows being encoded (users and items together: a training batch's, or the
        whole catalogue in evaluation); detached, so only the directions of f_m's outputs are learned."""
        rho = reps.detach().pow(2).sum(-1).mean(0).sqrt()  # [3]
        return (rho[0] / rho.clamp_min(1e-12)).view(1, 3, 1)

    def _cues(self, proj: nn.Linear, feats: torch.Tensor, users, items, modality: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h^m of the items, h^m of the users): Eq. 7 and Eq. 8's mean over each user's training items.
        For a batch: h_u = W (mean_{i in I_u} x_i) + b, exact because f_m is linear."""
        if self.cue_form == "purified_knn":  # h^m = S^m (E_items * sigmoid(f_m(X^m))), users: Eq. 8
            h_items = graph.spmm(self.cue_graphs[modality], self.item_embedding.weight * torch.sigmoid(proj(feats)))
            if users is None:
                return h_items, graph.spmm(self.user_history_mean, h_items)
            return h_items[items], graph.spmm(self.user_history_mean, h_items, rows=users)
        if users is None:
            h_items = proj(feats)
            return h_items, graph.spmm(self.user_history_mean, h_items)
        if items.numel() > 0.5 * self.n_items:  # most items are needed anyway: project all, read the rows
            h_items = proj(feats)
            return h_items[items], graph.spmm(self.user_history_mean, h_items, rows=users)
        mean_raw = graph.spmm(self.user_history_mean, feats, rows=users)  # [B, feature dim]
        h_users = mean_raw @ proj.weight.T
        if proj.bias is not None:
            h_users = h_users + (self.user_degree[users] > 0).to(mean_raw.dtype).unsqueeze(1) * proj.bias
        return proj(feats.index_select(0, items)), h_users  # (index_select: half the time of feats[items] at 4096-d)

    def expert_weights(self) -> torch.Tensor:
        """w_e over [B, A, S] for every expert [E, 3] (fixed templates or free softmax mixtures)."""
        w = torch.softmax(self.template_logits, dim=-1) if hasattr(self, "template_logits") else self.template_weights
        if self.per_expert_view:  # [E, 4] over [z^UI, z^UIG, A, S]
            a = torch.sigmoid(self.expert_view_logit)
            return torch.stack([w[:, 0] * (1 - a), w[:, 0] * a, w[:, 1], w[:, 2]], dim=1)
        return w

    @staticmethod
    def expert_inputs(weights: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
        """Eq. 10: x(w_e) = sum_m w_e^m r^m for rows of reps [N, 3, d] -> [N, E, d]."""
        return torch.einsum("em,nmd->ned", weights, reps)

    def score_pairs(self, tables: dict, users: torch.Tensor, items: torch.Tensor,
                    user_inputs: torch.Tensor | None = None, user_side: dict | None = None):
        """Alg. 1 for aligned (user, item) rows of ``tables`` (row positions in ``encode``'s output; the
        ids themselves when it encoded everything): returns (y [B], dense pi [B, E] or None, gates [B, E])."""
        w = self.expert_weights()
        xu = user_inputs if user_inputs is not None else self.expert_dropout(
            self.expert_inputs(w, tables["r_user"][users]))
        xi = self.expert_dropout(self.expert_inputs(w, tables["r_item"][items]))
        s_experts = self.heads.pair(xu, xi, user_side)  # Eq. 11: [B, E, d]
        if self.use_moe:
            z = tables["z_router"]
            pi = torch.softmax(self.router.pair(z[users], z[tables["n_users"] + items]), dim=-1)  # Eqs. 16-17
            gates = topk_gates(pi, self.top_k)  # Eqs. 18-19
        else:
            pi, gates = None, torch.ones(users.numel(), 1, device=users.device)
        s = (gates.unsqueeze(-1) * s_experts).sum(1)  # Eq. 20
        y = s @ self.score_vector  # Eq. 21
        if self.behaviour_residual:
            z = tables["z"]
            y = y + self.behaviour_residual * (z[users] * z[tables["n_users"] + items]).sum(-1)
        return y, pi, gates

    @torch.no_grad()
    def routing_probabilities(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Dense pi_ui (Eq. 17, before Top-K) for aligned (user, item) pairs in evaluation mode, and the
        expert names: the input of the routing diagnostics (Sec. 4.9, 5.3; ``main.py analyse / explain``)."""
        if not self.use_moe:
            raise ValueError("this run has moe: false, so there is no router to analyse")
        was_training = self.training
        self.eval()
        try:
            z = self.cached("routing_tables", self.encode)["z_router"]
            pi = torch.softmax(self.router.pair(z[users], z[self.n_users + items]), dim=-1)
        finally:
            self.train(was_training)
        return pi, list(self.expert_names)

    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, pos, neg = interaction["users"], interaction["pos_items"], interaction["neg_items"]
        # the batch's own users and items (sorted), and each pair's position among them
        batch_users, batch_items, u_at, pos_at, neg_at = graph.batch_rows(users, pos, neg)
        tables = self.encode(batch_users, batch_items, held_out=(users, pos))  # (target_edges: drop)
        reps_user = tables["r_user"][u_at]
        if self.cue_target == "exclude":  # h_u of Eq. 8 over I_u minus the positive being scored
            reps_user = self._cues_without_target(reps_user, tables["r_item"][pos_at], users)
        xu = self.expert_dropout(self.expert_inputs(self.expert_weights(), reps_user))
        side = self.heads.user_side(xu)  # shared by the positive and the negative pair
        y_pos, pi_pos, gates_pos = self.score_pairs(tables, u_at, pos_at, xu, side)
        y_neg, _, _ = self.score_pairs(tables, u_at, neg_at, xu, side)
        zero = y_pos.new_zeros(())
        out = {"bpr": bpr_loss(y_pos, y_neg, "mean"), "ctr": zero, "cov": zero, "conf": zero}  # Eq. 27 (mean)
        if self.cue_bpr != "none" and self.cue_bpr_weight > 0:
            out["cue_bpr"] = self.cue_bpr_weight * self.cue_ranking_loss(reps_user, tables["r_item"][pos_at],
                                                                         tables["r_item"][neg_at])
        if self.embedding_reg > 0:  # 0.5 (|e_u|^2 + |e_i|^2 + |e_j|^2), batch mean, on the layer-0 ID rows
            out["reg"] = self.embedding_reg * half_sq(self.user_embedding(users), self.item_embedding(pos),
                                                      self.item_embedding(neg), batch_size=users.numel())
        if tables["z_uig"] is not None and self.lambda_ctr > 0:  # Eq. 28, DV only: the batch's users and
            bu = torch.arange(batch_users.numel(), device=users.device)  # its positive items, in id order
            bi = torch.unique(pos_at) + batch_users.numel()
            z_ui, z_uig = tables["z_ui"], tables["z_uig"]
            out["ctr"] = self.lambda_ctr * view_contrastive(z_ui[bu], z_uig[bu], z_ui[bi], z_uig[bi], self.tau)
        if self.use_moe:
            out.update(self._routing_terms(pi_pos, gates_pos))
        if self.template_prior > 0:  # (lambda_t / |R|) sum_e KL(w_e^tpl || w_e)
            out["template_prior"] = self.template_prior * template_divergence(self.template_centre,
                                                                              self.template_logits)
        return out

    def cue_ranking_loss(self, reps_user: torch.Tensor, reps_pos: torch.Tensor, reps_neg: torch.Tensor) -> torch.Tensor:
        """``cue_bpr`` (docs/magnet.md): a BPR term per modality m in {A, S} that gives f_m a ranking signal of
        its own, as FREEDOM's and MGCN's modality branches have.  ``cue``: <h^m_u, h^m_i> ranks the positive over
        the negative (a content-only recommender inside the model); ``behaviour``: <z_u, h^m_i> with z_u
        detached (item cues pulled towards the collaborative space; only f_m learns from it)."""
        anchor = reps_user[:, 1:] if self.cue_bpr == "cue" else reps_user[:, :1].detach()  # [B, 2 | 1, d]
        pos = (anchor * reps_pos[:, 1:]).sum(-1)  # [B, 2]: A and S
        neg = (anchor * reps_neg[:, 1:]).sum(-1)
        return bpr_loss(pos[:, 0], neg[:, 0], "mean") + bpr_loss(pos[:, 1], neg[:, 1], "mean")

    def _cues_without_target(self, reps_user, reps_pos, users):
        """Training-time user cues with the positive item left out of the history mean (docs/magnet.md):
        (|I_u| h_u - h_i) / (|I_u| - 1); zero for a user whose only training item is the positive."""
        deg = self.user_degree[users][:, None, None]
        cues = (deg * reps_user[:, 1:] - reps_pos[:, 1:]) / (deg - 1).clamp_min(1.0)
        cues = torch.where(deg > 1, cues, torch.zeros_like(cues))
        return torch.cat([reps_user[:, :1], cues], dim=1)

    def _routing_terms(self, pi: torch.Tensor, gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eqs. 22-31 on the positive pairs' dense routing (controller advances only in training)."""
        n_experts = pi.shape[-1]
        pi_bar = pi.mean(0)  # Eq. 22
        h = entropy(pi_bar)  # Eq. 23
        h_norm = float(h.detach()) / math.log(n_experts)  # Eq. 24
        load = gates.detach().mean(0)
        load_norm = float(entropy(load)) / math.log(n_experts)
        signal = h_norm if self.switch_signal == "dense" else load_norm
        stage = self.controller.advance(signal) if self.training else int(self.controller.stage)
        lam_cov, lam_conf = self.controller.loss_weights(h_norm, stage)  # Eq. 31, after the stage update
        st = self._stats
        st["h_norm"] += h_norm
        st["n_eff"] += math.exp(float(h.detach()))  # Eq. 25
        st["signal"] += signal
        st["max_load"] += float((gates.detach() > 0).float().mean(0).max()) / self.top_k  # MaxLoad share
        st["top1_share"] += float(torch.bincount(pi.detach().argmax(-1), minlength=n_experts).max()) / pi.shape[0]
        if self.training and self.trace_every and self.controller.step % self.trace_every == 0:
            self._trace_row(pi.detach(), pi_bar.detach(), h_norm, signal, stage, gates.detach())
        st["w_cov"] += lam_cov  # effective weights of Eqs. 29-30 in Eq. 32 (Eq. 31's factors times lambda_r)
        st["w_conf"] += lam_conf
        st["steps"] += 1
        return {"cov": lam_cov * coverage_loss(pi_bar), "conf": lam_conf * confidence_loss(pi)}  # Eqs. 29-30

    def _trace_row(self, pi: torch.Tensor, pi_bar: torch.Tensor, h_norm: float, signal: float, stage: int,
                   gates: torch.Tensor) -> None:
        """One row of the per-step routing trace (``routing_trace_every``; Figs. 7-8's statistics, from the
        batch's dense pi before Top-K): H~, switch signal, stage, N_eff, Top-1 share, Top3Mass, MaxLoad share,
        top1-top2 gap and HHI normalised to [0, 1]."""
        n_experts = pi.shape[-1]
        top = pi.topk(min(3, n_experts), dim=-1).values
        hhi = float((pi_bar ** 2).sum())
        self._trace.append({
            "step": int(self.controller.step), "H~": h_norm, "signal": signal, "stage": stage,
            "N_eff": math.exp(float(entropy(pi_bar))),
            "top1_share": float(torch.bincount(pi.argmax(-1), minlength=n_experts).max()) / pi.shape[0],
            "top3_mass": float(top.sum(-1).mean()),
            "max_load": float((gates > 0).float().mean(0).max()) / self.top_k,  # share of Top-K assignments
            "top1_top2_gap": float((top[:, 0] - top[:, 1]).mean()) if n_experts > 1 else 1.0,
            "hhi_norm": (hhi - 1 / n_experts) / (1 - 1 / n_experts) if n_experts > 1 else 1.0})

    def drain_trace(self) -> list[dict]:
        rows, self._trace = self._trace, []
        return rows

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        users = interaction["users"]
        if self.use_moe and self.router.kind == "linear" and not self.router.product and (
                not self.heads.use_mlp or (users.device.type == "cpu" and native.available())):
            return self._rank_planes(users)
        scores = torch.empty(users.numel(), self.n_items, device=users.device)
        for items, y_experts, gates in self.expert_blocks(users):
            scores[:, items] = (gates * y_experts).sum(-1) if gates is not None else y_experts[..., 0]  # Eqs. 19-21
        return self._with_behaviour_residual(scores, users)

    def expert_blocks(self, users: torch.Tensor):
        """The general full-ranking path before the mix, over item blocks: (item slice, expert scores
        v^T s^(e) [users, items, E], Top-K gates [users, items, E] or None without a router).  v^T is
        linear, so Eq. 21's score is sum_e g_e v^T s^(e)."""
        tables = self.cached("tables", self.encode)
        w = self.expert_weights()
        x_items = self.cached("x_items", lambda: self.expert_inputs(w, tables["r_item"]))  # [I, E, d]
        xu = self.expert_inputs(w, tables["r_user"][users])
        z = tables["z_router"]
        zu, zi = z[users], z[self.n_users:]
        router_width = self.embedding_size if self.use_moe and (self.router.kind == "mlp" or self.router.product) else 0
        per_pair = self.n_experts * (self.embedding_size if self.heads.use_mlp else 1) + router_width  # floats
        item_block = max(1, self.score_block_budget // max(users.numel() * per_pair, 1))
        for lo in range(0, self.n_items, item_block):
            hi = min(lo + item_block, self.n_items)
            y_experts = self.heads.all_pairs(xu, x_items[lo:hi], self.score_vector)  # v^T s^(e): [U, I, E]
            gates = (topk_gates(torch.softmax(self.router.all_pairs(zu, zi[lo:hi]), dim=-1), self.top_k)
                     if self.use_moe else None)
            yield slice(lo, hi), y_experts, gates

    def _with_behaviour_residual(self, scores: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """``behaviour_residual``: scores + beta <z_u, z_i> for every item (in place)."""
        if self.behaviour_residual:
            z = self.cached("tables", self.encode)["z"]
            scores.addmm_(z[users], z[self.n_users:].T, alpha=self.behaviour_residual)
        return scores

    def plane_ranking_inputs(self, users: torch.Tensor) -> dict[str, torch.Tensor]:
        """What full ranking with a linear router multiplies, per expert (Eqs. 10-11, 16, 21): the router's
        user and item logits [E, U], [E, I]; for a hadamard head the users' (W_e x_u) * v [E, U, d] and the
        items' x_i transposed [E, d, I]; for a concat-MLP head the users' x_u W1_user + b1 [E, U, h], the
        items' x_i W1_item transposed [E, h, I], W2_e v [E, h] and b2_e . v [E].  Keys starting with
        ``item_`` hold the items on their last axis; they are computed once per evaluation pass."""
        tables = self.cached("tables", self.encode)
        w = self.expert_weights()
        z = tables["z_router"]
        xu = self.expert_inputs(w, tables["r_user"][users])
        x_items = self.cached("x_items", lambda: self.expert_inputs(w, tables["r_item"]))  # [I, E, d]
        heads, v = self.heads, self.score_vector
        parts = {"user_logits": self.router.user_half(z[users]).T,
                 "item_logits": self.cached("item_logits", lambda: self.router.item_half(z[self.n_users:]).T
                                            .contiguous())}
        if heads.use_hadamard:
            parts["user_vecs"] = torch.einsum("efd,ued->euf", heads.w_had, xu) * v
            parts["item_vecs_t"] = self.cached("item_vecs_t", lambda: x_items.permute(1, 2, 0).contiguous())
        if heads.use_mlp:
            parts["user_hidden"] = torch.einsum("ued,edh->euh", xu, heads.w1_user) + heads.b1.unsqueeze(1)
            parts["item_hidden_t"] = self.cached("item_hidden_t", lambda: torch.einsum(
                "ied,edh->ehi", x_items, heads.w1_item).contiguous())
            parts["out_weights"], parts["out_bias"] = torch.einsum("ehf,f->eh", heads.w2, v), heads.b2 @ v
        return parts

    def ranking_blocks(self, parts: dict[str, torch.Tensor]):
        """The blocks of full ranking over ``plane_ranking_inputs``' parts: (user slice, first item, the
        item parts of the block's items).  On a GPU a user chunk against every item ([E, chunk, I] under
        score_block_budget); on CPU cache-sized tiles of RANKING_USERS x RANKING_ITEMS (the item parts
        split once per evaluation pass)."""
        n_users = parts["user_logits"].shape[1]
        if parts["user_logits"].device.type == "cpu":
            chunk, step = self.RANKING_USERS, self.RANKING_ITEMS
        else:
            chunk, step = max(1, self.score_block_budget // max(self.n_experts * self.n_items, 1)), self.n_items
        tiles = self.cached(f"item_tiles_{step}", lambda: [
            (lo, {key: part[..., lo:lo + step].contiguous() for key, part in parts.items() if key.startswith("item_")})
            for lo in range(0, self.n_items, step)])
        for lo in range(0, n_users, chunk):
            for at, item_parts in tiles:
                yield slice(lo, min(lo + chunk, n_users)), at, item_parts

    @staticmethod
    def block_expert_scores(parts: dict[str, torch.Tensor], rows: slice, item_parts: dict[str, torch.Tensor]
                            ) -> torch.Tensor:
        """v^T s^(e) for a block of users x items [E, users, items] (Eqs. 11 + 21) from the plane parts."""
        y = None
        if "user_vecs" in parts:  # hadamard: y_e = <(W_e x_u) * v, x_i>, one batched product
            y = torch.bmm(parts["user_vecs"][:, rows], item_parts["item_vecs_t"])
        if "user_hidden" in parts:  # concat MLP: sum_h (W2_e v)_h relu(.)_h + b2_e . v, compiled
            mlp = native.relu_head_scores(parts["user_hidden"][:, rows], item_parts["item_hidden_t"],
                                          parts["out_weights"]) + parts["out_bias"].view(-1, 1, 1)
            y = mlp if y is None else y.add_(mlp)
        return y

    def _rank_planes(self, users: torch.Tensor) -> torch.Tensor:
        """Full ranking with a linear router, in expert planes: each block's expert scores
        (``block_expert_scores``), gates by ``topk_softmax_mix``; the same scores as the general path."""
        parts = self.plane_ranking_inputs(users)
        scores = torch.empty(users.numel(), self.n_items, device=users.device)
        for rows, at, item_parts in self.ranking_blocks(parts):
            item_logits = item_parts["item_logits"]
            scores[rows, at:at + item_logits.shape[1]] = topk_softmax_mix(
                self.block_expert_scores(parts, rows, item_parts), parts["user_logits"][:, rows], item_logits,
                self.top_k)
        return self._with_behaviour_residual(scores, users)

    # -- reporting -------------------------------------------------------------------------------
    def epoch_stats(self) -> dict[str, float]:
        n = self._stats["steps"]
        if not self.use_moe or n == 0:
            return {}
        out = {"H~": self._stats["h_norm"] / n, "N_eff": self._stats["n_eff"] / n,
               "signal": self._stats["signal"] / n, "max_load": self._stats["max_load"] / n,
               "top1_share": self._stats["top1_share"] / n,
               "w_cov": self._stats["w_cov"] / n, "w_conf": self._stats["w_conf"] / n,
               "stage": int(self.controller.stage)}
        if int(self.controller.switch_step) >= 0:
            out["switch_step"] = int(self.controller.switch_step)
        if self.modality_scale == "learned":
            out["gain_A"], out["gain_S"] = self.cue_log_gain.detach().exp().tolist()
        return out

    def extra_results(self) -> dict:
        switch = int(self.controller.switch_step)
        res = {**self.graph_stats, "n_experts": self.n_experts, "experts": self.expert_names,
               "routing_schedule": self.schedule, "final_stage": int(self.controller.stage),
               "switch_step": switch, "switch_epoch": int(self.controller.switch_epoch),
               "stage1_steps": (switch - 1 if switch > 0 else 0) if switch >= 0 else int(self.controller.step),
               "train_steps": int(self.controller.step)}
        if self.use_moe and self.schedule == "fixed_step" and switch < 0:
            log.warning("routing_schedule fixed_step: training ended at epoch %d before fixed_switch_epoch=%d; "
                        "the run never left stage 1", int(self.controller.epoch), self.fixed_switch_epoch)
        return res
