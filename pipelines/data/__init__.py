"""Streaming pretraining data: shard sources and recipes (`shards`), tar and .npy reading
(`tario`), sample decoding and checks (`samples`), tokenization, masking, the batch contract
(`batching`) and the loader that joins them (`loader`)."""
