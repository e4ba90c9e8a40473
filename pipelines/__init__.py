"""Data, training and downstream tasks on top of the model library `vilbert` and the shard format
of `common`: `data/` (streaming shards into batches), `train/` (the trainer), `tasks/` (fine-tuning
and evaluation), `synthetic/` (generated scenes for tests and the demo), and the command lines on
top of them: `train_cli` (vilbert-train), `eval_cli` (vilbert-eval), `demo` (vilbert-demo)."""
