"""mmrec: an MMRec-style framework for multimodal recommendation (our own implementation).

Packages: config (layered yaml), data (MMRec-format loading, splits, sampling), recommender (the model
contract), trainer (fit / evaluate / early stopping / checkpoints), evaluation (full-ranking metrics),
registry (model discovery), graph / losses (shared primitives every model calls), cache (LMDB store).
"""
__version__ = "0.1.0"
