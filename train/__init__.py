"""`bricks-train`: streaming shards into STDiT2 training: not built yet."""
