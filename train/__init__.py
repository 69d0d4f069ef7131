"""Training STDiT2 on `bricks-dj` shards: `bricks-train`.

Data: `shards` indexes Parquet shards without reading media, `buckets` assigns samples to
Open-Sora 1.1's (resolution, frames, aspect ratio) buckets, `plan` deals each epoch's batches
to ranks and loader workers from metadata alone, `decode` turns a row into pixels, and
`loader` streams it all, resumable to the batch.

Training: `config` (the YAML, validated), `trainer` (the loop), `masks`, `lr_schedule` and
`ema` (its small parts), `parallel` (process group, DDP and FSDP2), `colossal` (ColossalAI's
Booster, in its own environment), `checkpoint` and `metrics` (what a run writes), `cli`.
"""
