"""A resumed fairseq-train trains on the batches an uninterrupted run trains on.

fairseq-fixed 0.12.3.1 (``FairseqTask.get_batch_iterator``) builds a run's batches once, when the training iterator
is first created, from a random order drawn under the seed ``seed + epoch`` (the order breaks the ties of the sort by
length, and so decides which sentences share a batch); every later epoch reuses those batches, reshuffled. An
uninterrupted run creates the iterator at epoch 1; a run resumed from a checkpoint creates it at the epoch it
resumes, and from there on trains on other batches than an uninterrupted run would (measured on the QUICK toy task:
every batch of the resumed epochs differed, and the weights by up to 8e-3 after 15 more updates). fairseq 0.12.2
draws that order under ``seed`` alone and is unaffected; fairseq has no option for it.

``build_batches_as_from_epoch_one`` makes the first training iterator of a process build its batches as at epoch 1
and then start at the epoch asked for. An uninterrupted run is unchanged (its iterator is created at epoch 1), and so
is every iterator fairseq does not reuse across epochs (``disable_iterator_cache``, datasets that cannot reuse
batches): those are built anew at every epoch, in an uninterrupted run too.
"""

from __future__ import annotations

import functools
import inspect
import logging

logger = logging.getLogger(__name__)
PATCHED = "_rela_builds_batches_as_from_epoch_one"


def build_batches_as_from_epoch_one() -> None:
    """Wrap ``FairseqTask.get_batch_iterator`` as the module's docstring says (idempotent)."""
    from fairseq.tasks.fairseq_task import FairseqTask

    original = FairseqTask.get_batch_iterator
    if getattr(original, PATCHED, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_batch_iterator(self, *args, **kwargs):
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        options = call.arguments
        epoch, dataset = options["epoch"], options["dataset"]
        # the iterator fairseq will keep for every later epoch (its own condition), created after epoch 1: a resume
        reused_across_epochs = (not options.get("disable_iterator_cache", False)
                                and not options.get("update_epoch_batch_itr", False)
                                and self.can_reuse_epoch_itr(dataset))
        if epoch <= 1 or not reused_across_epochs or dataset in self.dataset_to_epoch_iter:
            return original(*call.args, **call.kwargs)
        options["epoch"] = 1
        iterator = original(*call.args, **call.kwargs)
        iterator.epoch = epoch  # what the constructor sets from its epoch argument; nothing else depends on it
        dataset.set_epoch(epoch)
        logger.info(f"resuming at epoch {epoch}: the batches are built as an uninterrupted run built them at epoch 1")
        return iterator

    setattr(get_batch_iterator, PATCHED, True)
    FairseqTask.get_batch_iterator = get_batch_iterator
