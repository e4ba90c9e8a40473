"""Downstream tasks for `vilbert-eval`. Each task is one class in its own module (see
`pipelines.tasks.base.Task`); this dict is the only registry. Adding a task means writing its module
and adding one entry here."""
from .gqa import GQATask
from .nlvr2 import NLVR2Task
from .refcoco import RefCOCOgTask, RefCOCOTask, RefCOCOUncTask
from .retrieval import RetrievalTask
from .snli_ve import SNLIVETask
from .vcr import VCRTask
from .vqa import VQATask

TASKS = {
    "refcoco": RefCOCOUncTask,
    "refcoco+": RefCOCOTask,
    "refcocog": RefCOCOgTask,
    "retrieval": RetrievalTask,
    "nlvr2": NLVR2Task,
    "snli-ve": SNLIVETask,
    "vqa": VQATask,
    "gqa": GQATask,
    "vcr": VCRTask,
}

__all__ = ["TASKS", "GQATask", "NLVR2Task", "RefCOCOTask", "RefCOCOUncTask", "RefCOCOgTask", "RetrievalTask",
           "SNLIVETask", "VCRTask", "VQATask"]
