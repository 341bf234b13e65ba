"""Data: the procedural toy world, real-video preprocessing to shards, and the datasets that read them."""
