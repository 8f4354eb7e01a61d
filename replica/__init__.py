"""One model server: HTTP layer -> pure scheduler -> model runner. Knows nothing of other replicas."""
