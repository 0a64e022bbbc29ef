"""Learning curves: a run's validation loss (fairseq-train's own valid lines) and the validation BLEU of every
checkpoint it saved every ``save_interval_updates`` and of its last state (each decoded alone, not averaged, with the
run's evaluate settings). BLEU per checkpoint is cached in RESULTS_ROOT/<task>/curves/<run>.json and decoded again
only for a checkpoint written since or under other evaluate settings.
"""

from __future__ import annotations

import logging
import os
import re

from ..averaging import CHECKPOINT_NAMES, checkpoint_updates
from ..files import read_json, write_json
from .config import Setting, Task

logger = logging.getLogger(__name__)
# fairseq-train's summary of a validation, e.g. "| valid on 'valid' subset | loss 4.36 | nll_loss 2.9 | ... |
# num_updates 1000 | best_loss 4.36"
_VALID_LINE = re.compile(r"valid on 'valid' subset \| loss ([\d.]+) \|.*?\| num_updates (\d+)")


def valid_losses(log: str) -> dict[int, float]:
    """{updates: validation loss} from a fairseq-train log (a resumed run may validate an update twice: the last
    line counts)."""
    return {int(updates): float(loss) for loss, updates in _VALID_LINE.findall(log)}


def run_valid_losses(checkpoint_dir: str) -> dict[int, float]:
    log = os.path.join(checkpoint_dir, "train.log")
    if not os.path.exists(log):
        return {}
    with open(log, encoding="utf-8", errors="replace") as f:
        return valid_losses(f.read())


def curve_checkpoints(checkpoint_dir: str) -> dict[int, str]:
    """{updates: path} of the checkpoints saved every save_interval_updates (checkpoint_<epoch>_<updates>.pt) and of
    the run's last state (checkpoint_last.pt), which fairseq saves under an epoch's name instead where training ends
    with an epoch."""
    found = {}
    for name in os.listdir(checkpoint_dir):
        match = CHECKPOINT_NAMES["update"].fullmatch(name)
        if match:
            found[int(match.group(1))] = os.path.join(checkpoint_dir, name)
    last = os.path.join(checkpoint_dir, "checkpoint_last.pt")
    if os.path.exists(last):
        found.setdefault(checkpoint_updates(last), last)
    return dict(sorted(found.items()))


def learning_curve(task: Task, system: str, seed: int, setting: Setting, bleu: bool = True) -> list[dict]:
    """[{"updates", "valid_loss", "valid_bleu"}] of one run, by updates; ``valid_bleu`` None where the checkpoint of
    that update was not kept (keep_interval_updates) or ``bleu`` is off."""
    from .evaluate import translate_and_score

    checkpoint_dir = task.checkpoint_dir(system, seed, setting)
    run = task.run_name(system, seed, setting)
    losses = run_valid_losses(checkpoint_dir)
    checkpoints = curve_checkpoints(checkpoint_dir) if bleu else {}
    cache_path = os.path.join(task.results_dir, "curves", f"{run}.json")
    cache = read_json(cache_path) if os.path.exists(cache_path) else {}
    if cache.get("evaluate_settings") != setting.evaluate:
        cache = {"evaluate_settings": setting.evaluate, "checkpoints": {}}
    scored = cache["checkpoints"]
    for number, (updates, path) in enumerate(checkpoints.items(), 1):
        name, written = os.path.basename(path), os.path.getmtime(path)
        if scored.get(name, {}).get("written") == written:
            continue
        logger.info(f"{run}: learning curve, validation BLEU of {name} ({number}/{len(checkpoints)})")
        translated = translate_and_score(task, path, setting.evaluate, "valid")
        scored[name] = {"updates": updates, "written": written, "bleu": translated["scores"]["sacrebleu"]["score"]}
        write_json(cache_path, cache)  # a kill loses at most the checkpoint being decoded
    bleu_at = {entry["updates"]: entry["bleu"] for name, entry in scored.items()
               if os.path.basename(checkpoints.get(entry["updates"], "")) == name}
    return [{"updates": updates, "valid_loss": losses.get(updates), "valid_bleu": bleu_at.get(updates)}
            for updates in sorted(set(losses) | set(bleu_at))]
