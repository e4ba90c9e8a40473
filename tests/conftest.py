"""Suite-wide settings: tiny models on a 2-core machine run fastest with one intra-op thread
(with two, OpenMP spin-waiting against the other test processes costs far more than it gains)."""
import torch

torch.set_num_threads(1)
