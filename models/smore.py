"""SMORE: Spectrum-based Modality Representation Fusion Graph Convolutional Network for Multimodal
Recommendation (Ong & Khong, WSDM 2025).

    x_m  = P_m f_m                                   projected raw features (f_m trainable), m in {v, t}
    F(.) = orthonormal real FFT along the embedding axis (d -> d/2 + 1 complex bins)
    c_v  = F^-1(F(x_v) w_v),  c_t = F^-1(F(x_t) w_t)          uni-modal spectral denoising   (Eq. 3-4)
    c_f  = F^-1(F(x_v) F(x_t) w_f)                             spectral fusion               (Eq. 5)
    e_m  = E_i * sigmoid(W_m c_m + b_m),  m in {v, t, f}       purifier gates                (Eq. 6)
    X_m  = [R S_m e_m; S_m e_m]                                item-item views; S_f = max(S_v, S_t)
    C    = mean_{l=0..L} A^l [E_u; E_i]                        user-item view (LightGCN, sym)
    X'_v = softmax_d(q_v(X_f)) * X_v,  X'_t = softmax_d(q_t(X_f)) * X_t   modality-aware preference
    side = mean(g_v * X'_v, g_t * X'_t, g_f * X_f),  g_m = dropout(sigmoid(W'_m C + b'_m))
    Z    = C + side,  y_ui = <Z_u, Z_i>

Loss (MGCN's, one implementation: ``models.mgcn.MGCNFamily``): BPR-mean + reg_weight * HalfSq(final batch) / train_batch_size
+ cl_loss * [InfoNCE(side_i[pos], C_i[pos]) + InfoNCE(side_u[b], C_u[b])].

Parity with MMRec ``src/models/smore.py`` (= kennethorq/SMORE): complex filters drawn N(0, 1) for real
and imaginary parts ([1, d/2+1, 2]); the inverse FFT is ``irfft(n=d)``, which ignores the imaginary
parts of the DC and Nyquist bins; the fusion graph is the union of the two normalised KNN-SIM graphs
with the larger of the two weights where both have an edge (no re-normalisation); the preference
gates use inverted dropout (identity at evaluation); ``q_v`` / ``q_t`` are separate
Linear(d,d)-Tanh-Linear(d,d, no bias) networks softmaxed over the d dimensions.  The InfoNCE
temperature is hard-coded 0.2 in the reference (its ``temperature`` key is unused); here it is the
config key ``cl_temperature`` with default 0.2.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mmrec import graph
from mmrec.layers import BehaviourPurifier, SigmoidGate, item_graph_view
from models.mgcn import MGCNFamily


def max_union(a: sp.spmatrix, b: sp.spmatrix) -> sp.csr_matrix:
    """Union of the edges of a and b; where both have an edge keep the larger value (values of edges
    present in one graph only are kept as they are, even if negative)."""
    a, b = sp.coo_matrix(a), sp.coo_matrix(b)
    n_cols = a.shape[1]
    keys = np.concatenate([a.row.astype(np.int64) * n_cols + a.col, b.row.astype(np.int64) * n_cols + b.col])
    vals = np.concatenate([a.data, b.data])
    order = np.lexsort((-vals, keys))  # by key, largest value first
    keys, vals = keys[order], vals[order]
    first = np.ones(keys.shape[0], dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    keys, vals = keys[first], vals[first]
    return sp.csr_matrix((vals, (keys // n_cols, keys % n_cols)), shape=a.shape)


class DimensionPreference(nn.Module):
    """softmax over the d dimensions of Linear(d,d) - Tanh - Linear(d,d, no bias) (SMORE's q_v, q_t)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.query(x), dim=-1)


class SMORE(MGCNFamily):
    """Spectral (FFT) fusion of modality representations, modality-specific item graphs and gated fusion
    with a contrastive term. Paper and equations: this module's docstring. Keys it reads
    (configs/model/SMORE.yaml): cl_loss, cl_temperature, dropout_rate, image_knn_k, n_layers, n_ui_layers,
    reg_weight, text_knn_k, train_batch_size."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.pref_v = DimensionPreference(d)
        self.pref_t = DimensionPreference(d)
        self.purifier_v = BehaviourPurifier(d)
        self.purifier_t = BehaviourPurifier(d)
        self.purifier_f = BehaviourPurifier(d)
        self.prefer_v = SigmoidGate(d)
        self.prefer_t = SigmoidGate(d)
        self.prefer_f = SigmoidGate(d)
        self.gate_dropout = nn.Dropout(float(config["dropout_rate"]))
        # complex spectral filters, (real, imag) pairs over d/2 + 1 bins
        bins = d // 2 + 1
        self.image_filter = nn.Parameter(torch.randn(1, bins, 2))
        self.text_filter = nn.Parameter(torch.randn(1, bins, 2))
        self.fusion_filter = nn.Parameter(torch.randn(1, bins, 2))

    def build_item_graphs(self, config, dataset) -> None:
        self.image_knn_k = int(config["image_knn_k"])
        self.text_knn_k = int(config["text_knn_k"])
        image_graph = self.item_knn_matrix("v", self.image_knn_k, "sim")
        text_graph = self.item_knn_matrix("t", self.text_knn_k, "sim")
        self.image_graph = graph.to_torch_sparse(image_graph, self.device)
        self.text_graph = graph.to_torch_sparse(text_graph, self.device)
        self.fusion_graph = graph.to_torch_sparse(max_union(image_graph, text_graph), self.device)

    def spectrum_convolution(self, x_v: torch.Tensor, x_t: torch.Tensor):
        """Eq. 3-5: (c_v, c_t, c_f) by filtering in the orthonormal frequency domain."""
        d = x_v.shape[1]
        f_v = torch.fft.rfft(x_v, dim=1, norm="ortho")
        f_t = torch.fft.rfft(x_t, dim=1, norm="ortho")
        w_v, w_t, w_f = (torch.view_as_complex(w) for w in (self.image_filter, self.text_filter, self.fusion_filter))
        c_v = torch.fft.irfft(f_v * w_v, n=d, dim=1, norm="ortho")
        c_t = torch.fft.irfft(f_t * w_t, n=d, dim=1, norm="ortho")
        c_f = torch.fft.irfft(f_v * f_t * w_f, n=d, dim=1, norm="ortho")
        return c_v, c_t, c_f

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (Z_users, Z_items, side [U+I, d], content [U+I, d])."""
        item_ids = self.item_embedding.weight
        c_v, c_t, c_f = self.spectrum_convolution(self.image_proj(self.image_embedding.weight),
                                                  self.text_proj(self.text_embedding.weight))
        e_v = self.purifier_v(item_ids, c_v)  # Eq. 6
        e_t = self.purifier_t(item_ids, c_t)
        e_f = self.purifier_f(item_ids, c_f)

        ego = torch.cat([self.user_embedding.weight, item_ids], dim=0)
        content = graph.propagate(self.adj, ego, self.n_ui_layers)

        x_v = item_graph_view(self.image_graph, self.R, e_v, self.n_layers)
        x_t = item_graph_view(self.text_graph, self.R, e_t, self.n_layers)
        x_f = item_graph_view(self.fusion_graph, self.R, e_f, self.n_layers)

        # modality-aware preference module
        x_v = self.pref_v(x_f) * x_v
        x_t = self.pref_t(x_f) * x_t
        g_v = self.gate_dropout(self.prefer_v(content))
        g_t = self.gate_dropout(self.prefer_t(content))
        g_f = self.gate_dropout(self.prefer_f(content))
        side = (g_v * x_v + g_t * x_t + g_f * x_f) / 3
        z = content + side
        return z[: self.n_users], z[self.n_users:], side, content
