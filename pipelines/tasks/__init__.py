"""Downstream tasks for `vilbert-eval`. Each task is one class in its own module (see
`pipelines.tasks.base.Task`); this dict is the only registry. Adding VCR, NLVR2 or SNLI-VE means
writing its module and adding one entry here."""
from .refcoco import RefCOCOgTask, RefCOCOTask, RefCOCOUncTask
from .retrieval import RetrievalTask
from .vqa import VQATask

TASKS = {
    "refcoco": RefCOCOUncTask,
    "refcoco+": RefCOCOTask,
    "refcocog": RefCOCOgTask,
    "retrieval": RetrievalTask,
    "vqa": VQATask,
}

__all__ = ["TASKS", "RefCOCOTask", "RefCOCOUncTask", "RefCOCOgTask", "RetrievalTask", "VQATask"]
