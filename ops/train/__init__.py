"""Training loops shared by commands and attacks (DreamBooth surrogates now; ``cloak train-db`` reuses them)."""
