"""Measuring models: perplexity and task accuracy now; the judge and the arena's ratings beside them.

Uses the runtime in-process (or, later, any OpenAI-compatible endpoint); must not import train or cli.
"""

from nomoat.eval.perplexity import PerplexityResult, loss_sum, perplexity
from nomoat.eval.tasks import METRICS, TaskRecord, TaskResult, load_task, score, task_accuracy

__all__ = ["METRICS", "PerplexityResult", "TaskRecord", "TaskResult", "load_task", "loss_sum", "perplexity", "score",
           "task_accuracy"]
