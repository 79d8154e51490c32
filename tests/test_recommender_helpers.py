"""GeneralRecommender helpers shared by the models."""
import numpy as np
import pytest
@pytest.mark.parametrize("name", ["MGCN", "MAGNET", "GUME"])
def test_models_needing_both_modalities_name_the_missing_one(tmp_path, name):
    from mmrec.config import load_config
    from mmrec.data.dataset import RecDataset
    from mmrec.registry import get_model
    from tests.helpers import random_interactions, write_dataset

    users, items, labels = random_interactions(30, 20, seed=0)
    write_dataset(tmp_path, "toy", users, items, labels, v_feat=np.ones((20, 4)))  # no text_feat.npy
    config = load_config(name, "toy", {"data_path": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
                                       "text_feature_file": None})  # a dataset without a text modality
    with pytest.raises(ValueError, match=rf"{name} needs both image and text.*no text \(text_feature_file\)"):
        get_model(name)(config, RecDataset(config))


def test_xavier_tables_draw_the_references_stream():
    """All tables are created before any is re-initialised (MMRec's order), so a seed gives the same weights."""
    import torch
    from torch import nn
    from mmrec.layers import xavier_tables

    torch.manual_seed(3)
    users, items = xavier_tables(7, 5, dim=4)
    torch.manual_seed(3)
    ref_u, ref_i = nn.Embedding(7, 4), nn.Embedding(5, 4)
    nn.init.xavier_uniform_(ref_u.weight)
    nn.init.xavier_uniform_(ref_i.weight)
    assert torch.equal(users.weight, ref_u.weight) and torch.equal(items.weight, ref_i.weight)
    bound = (6 / (7 + 4)) ** 0.5  # Xavier-uniform bound on a [7, 4] table
    assert users.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="init must be 'uniform' or 'normal'"):
        xavier_tables(3, dim=2, init="kaiming")


def test_dot_bpr_and_side_content_nce_by_hand():
    import math
    import torch
    import torch.nn.functional as F
    from mmrec.losses import dot_bpr, side_content_nce

    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # scores: pos (2, 2), neg (0, 0) -> -log sigmoid(2) for both rows
    assert dot_bpr(u, p, n).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)

    side = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])   # 2 users, 2 items
    content = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    users, items = torch.tensor([0, 1]), torch.tensor([1, 0])

    def nce(a, b, t):  # the definition, row by row
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        logits = a @ b.T / t
        return -(logits.diag() - logits.logsumexp(dim=1)).mean()

    want = nce(side[2 + items], content[2 + items], 0.5) + nce(side[users], content[users], 0.2)
    got = side_content_nce(side, content, 2, users, items, 0.5, user_temperature=0.2)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_checkpoints_under_earlier_parameter_names_still_load(tiny):
    """item_id_embedding / image_trs (MGCN's earlier names) map to item_embedding / image_proj on load."""
    import torch
    from mmrec.registry import available_models, get_model

    config, ds = tiny("MGCN")
    model = get_model("MGCN")(config, ds)
    old = {k.replace("item_embedding.", "item_id_embedding.").replace("image_proj.", "image_trs."): v + 1
           for k, v in model.state_dict().items()}
    assert "item_id_embedding.weight" in old and "image_trs.weight" in old
    model.load_state_dict(old)  # strict: every key accounted for
    assert torch.equal(model.item_embedding.weight, old["item_id_embedding.weight"])
    assert torch.equal(model.image_proj.bias, old["image_trs.bias"])
    assert "MGCNFamily" not in available_models()  # the shared skeleton is not a model
