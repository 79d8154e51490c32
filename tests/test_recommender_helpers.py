"""GeneralRecommender helpers shared by the models."""
import numpy as np
import pytest
@pytest.mark.parametrize("name", ["MGCN", "MAGNET", "GUME"])
def test_models_needing_both_modalities_name_the_missing_one(tmp_path, name):
    from mmrec.config import load_config
    from mmrec.data.dataset import RecDataset
    from mmrec.registry import get_model
    from tests.conftest import random_interactions, write_dataset

    users, items, labels = random_interactions(30, 20, seed=0)
    write_dataset(tmp_path, "toy", users, items, labels, v_feat=np.ones((20, 4)))  # no text_feat.npy
    config = load_config(name, "toy", {"data_path": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
                                       "text_feature_file": None})  # a dataset without a text modality
    with pytest.raises(ValueError, match=rf"{name} needs both image and text.*no text \(text_feature_file\)"):
        get_model(name)(config, RecDataset(config))
