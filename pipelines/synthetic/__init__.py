"""Synthetic scenes, the one home of the generated data the tests and the demo use:

- `scenes`: scenes as region features (`SyntheticTask`: colour + shape vectors, captions naming
  objects), in batches of the trainer's contract;
- `shards`: the same scenes written as region-feature shards, with their vocabulary;
- `learning`: the in-memory learning proof on them (`vilbert-demo --in-memory`);
- `images`: scenes as pictures, the bundled sample corpus data/sample/ (`make_sample.py`).
"""
