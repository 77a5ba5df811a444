"""fastseq.data: tasks (loading, partition keys, collation, loss, evaluation).

```python
from fastseq.data import get_task
task = get_task("bbc-news")
data = task.load(data_path=None, seed=0, max_examples=None)
batch = task.collate(data.train[:8], tokenizer)
loss = task.loss(model, batch)
metrics = task.evaluate(model, data.test, tokenizer, batch_size=16)
```

See docs/tasks.md for the tasks, their data sources, partition keys and metrics.
"""

from . import metrics
from . import hf  # noqa: F401 - registers the 'hf' task
from .base import DataError, Task, TaskData, get_task, list_tasks, register_task, task_options
from .instruction import AUTHORS_PROMPT, InstructionTask, ensure_pad_token
from .text_classification import SyntheticTask, TextClassificationTask
from .vision import ImageClassificationTask, ImageFolderTask, SyntheticImageTask

__all__ = [
    "AUTHORS_PROMPT", "DataError", "ImageClassificationTask", "ImageFolderTask", "InstructionTask",
    "SyntheticImageTask", "SyntheticTask", "Task", "TaskData", "TextClassificationTask", "ensure_pad_token",
    "get_task", "list_tasks", "metrics", "register_task", "task_options",
]
