"""Data: MMRec-format loading and validation, splits, training batches with negatives."""
from mmrec.data.dataset import DataError, RecDataset, mmrec_split_labels
from mmrec.data.sampler import NegativeSampler, TrainBatches

__all__ = ["DataError", "RecDataset", "mmrec_split_labels", "NegativeSampler", "TrainBatches"]
