"""What `vilbert/`, `extractor/` and `pipelines/` share, below all of them: the `--device` check, the
shard format's names (docs/shard-format.md) and the crash-safe `ShardWriter`. Imports nothing of
this project."""
