"""Training STDiT2 on `bricks-dj` shards.

Built so far: the data side. `shards` indexes Parquet shards without reading media,
`buckets` assigns samples to Open-Sora 1.1's (resolution, frames, aspect ratio) buckets,
`plan` deals each epoch's batches to ranks and loader workers from metadata alone, `decode`
turns a row into pixels, and `loader` streams it all, resumable to the batch. The training
loop and the `bricks-train` command are not built yet.
"""
