"""Model files: one GeneralRecommender per file, found by name by mmrec.registry."""
