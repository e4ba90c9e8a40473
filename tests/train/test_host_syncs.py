"""The host-sync counter: which ops it flags, and a training step with none."""
import tempfile

import numpy as np
import torch
import torchvision

from pipelines.synthetic.scenes import SyntheticTask
from pipelines.train.host_syncs import HostSyncCounter, count_step_syncs
from pipelines.train.metrics import new_step_sums
from pipelines.train.trainer import TrainConfig, Trainer


def test_counter_flags_data_dependent_ops_and_scalar_reads_only():
    x = torch.randn(10, 4)
    mask = x[:, 0] > 0
    with HostSyncCounter() as syncs:
        x.sum().item()  # scalar read
        bool(mask.any())  # scalar read
        x[mask]  # boolean-mask gather
        x[mask] = torch.zeros(4)  # boolean-mask scatter of a row
        torch.nonzero(mask, as_tuple=True)
        torch.where(mask)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torchvision.ops.nms(torch.tensor([[0, 0, 1, 1.0], [0, 0, 1, 1.1]]), torch.tensor([1.0, 0.5]), 0.5)
    assert syncs.counts == {"aten::_local_scalar_dense": 2, "aten::index": 1, "aten::index_put_": 1,
                            "aten::nonzero": 2, "aten::repeat_interleave": 1, "torchvision::nms": 1}
    assert syncs.total == 8 and syncs.ops >= 8
    with HostSyncCounter() as fixed_shapes:
        torch.nonzero_static(mask, size=10)
        torch.where(mask, 1.0, 0.0)
        x[mask] = 0.0  # runs as masked_fill_
        x.masked_fill(mask[:, None], 1.0)
        x[torch.tensor([1, 2])]
        x.repeat_interleave(2, dim=0)
        x.sum(), x.topk(3, dim=0), x.argsort(dim=0)
        with fixed_shapes.paused():
            x.sum().item()
    assert fixed_shapes.total == 0, fixed_shapes.counts


def test_the_static_training_step_never_waits_for_the_device():
    """Fixed-size heads + on-device non-finite skip: no op of the step needs a value on the host
    (the exact selection, for contrast, syncs twice per micro-batch: token and region nonzero)."""
    task = SyntheticTask()
    batch = task.batch(8, np.random.default_rng(0))
    counts = {}
    for static in (False, True):
        trainer = Trainer(TrainConfig(
            out=tempfile.mkdtemp(), preset="vilbert-tiny", batch_size=16, micro_batch_size=8, static_heads=static,
            tensorboard=False, model_overrides=dict(vocab_size=task.vocab_size, v_feature_size=task.feature_size,
                                                    v_target_size=task.num_classes, max_position_embeddings=16)))
        stats = new_step_sums(trainer.device)
        trainer.model.train()
        count_step_syncs(trainer, trainer.model, batch, stats)  # the first step creates the optimizer state
        counted = count_step_syncs(trainer, trainer.model, batch, stats)
        counts[static] = counted.counts
        assert counted.ops > 100 and trainer.optimizer.state  # the step did run and update
    assert counts[False] == {"aten::nonzero": 4}  # 2 micro-batches x (tokens, regions)
    assert counts[True] == {}
