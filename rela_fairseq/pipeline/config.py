"""Task configurations (``configs/<task>.yaml``) and where the pipeline keeps its files.

Paths come from the environment, with defaults under the project's ``work/`` folder (ignored by git):

    DATA_ROOT        downloads, extracted text, sentencepiece model, binarised data   (work/data)
    CHECKPOINT_ROOT  one folder per task and system                                    (work/checkpoints)
    RESULTS_ROOT     one JSON result (and the detokenised output) per task and system  (work/results)
    RELA_CONFIG_DIR  the task configurations                                           (configs/)
    QUICK=1          shrink data, model and updates to a smoke run of a minute or two on CPU, through the same
                     code; quick runs live in folders of their own (<task>-quick) and never mix with real ones.
"""

import copy
import os

from ..errors import RelaConfigError
from ..systems import SYSTEMS

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOP_LEVEL_KEYS = {"description", "src", "tgt", "data", "clean", "sentencepiece", "train", "evaluate", "paper", "quick"}
REQUIRED_KEYS = {"description", "src", "tgt", "data", "sentencepiece", "train", "evaluate"}


def config_dir():
    return os.environ.get("RELA_CONFIG_DIR") or os.path.join(PROJECT_ROOT, "configs")


def available_tasks():
    directory = config_dir()
    if not os.path.isdir(directory):
        raise RelaConfigError(f"no task configurations at {directory}: run the scripts from a checkout of "
                              "rela-fairseq or set RELA_CONFIG_DIR")
    return sorted(name[:-5] for name in os.listdir(directory) if name.endswith(".yaml") and not name.startswith("_"))


def quick_mode():
    value = os.environ.get("QUICK", "0").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise RelaConfigError(f"QUICK={value!r}: use QUICK=1 for a smoke run or QUICK=0 (default)")


def _merge(base, override):
    """Recursive dict merge: override's values win, nested dicts are merged."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Task:
    """One task's settings, with QUICK=1 overrides applied, and its paths."""

    def __init__(self, name, settings, quick):
        self.name, self.quick = name, quick
        self.settings = _merge(settings, settings.get("quick")) if quick else settings
        self.src, self.tgt = settings["src"], settings["tgt"]
        tag = f"{name}-quick" if quick else name
        self.data_dir = os.path.join(_root("DATA_ROOT", "data"), tag)
        self.checkpoint_root = os.path.join(_root("CHECKPOINT_ROOT", "checkpoints"), tag)
        self.results_dir = os.path.join(_root("RESULTS_ROOT", "results"), tag)

    def __getitem__(self, key):
        return self.settings[key]

    def get(self, key, default=None):
        return self.settings.get(key, default)

    def path(self, *parts):
        return os.path.join(self.data_dir, *parts)

    @property
    def bin_dir(self):
        return self.path("bin")

    def checkpoint_dir(self, system):
        return os.path.join(self.checkpoint_root, system)

    def result_path(self, system):
        return os.path.join(self.results_dir, f"{system}.json")


def _root(variable, default_name):
    return os.path.abspath(os.environ.get(variable) or os.path.join(PROJECT_ROOT, "work", default_name))


def _read_yaml(path):
    import yaml

    with open(path, encoding="utf-8") as f:
        settings = yaml.safe_load(f)
    if not isinstance(settings, dict):
        raise RelaConfigError(f"{path}: expected a mapping of settings, got {type(settings).__name__}")
    return settings


def load_task(name, quick=None):
    """A task's settings: configs/_defaults.yaml, then configs/<name>.yaml on top (nested keys merge)."""
    tasks = available_tasks()
    if name not in tasks:
        raise RelaConfigError(f"unknown task {name!r}; choose one of {', '.join(tasks)} "
                              f"(one file per task in {config_dir()})")
    path = os.path.join(config_dir(), f"{name}.yaml")
    own = _read_yaml(path)
    defaults_path = os.path.join(config_dir(), "_defaults.yaml")
    settings = _merge(_read_yaml(defaults_path), own) if os.path.exists(defaults_path) else own
    unknown = set(own) - TOP_LEVEL_KEYS
    missing = REQUIRED_KEYS - set(settings)
    if unknown or missing:
        raise RelaConfigError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                              f"accepted: {sorted(TOP_LEVEL_KEYS)}")
    data = settings["data"]
    if not data.get("generator"):
        absent = [key for key in ("downloads", "train", "valid", "test") if not data.get(key)]
        if absent:
            raise RelaConfigError(f"{path}: data needs {', '.join(absent)} (or a generator)")
    return Task(name, settings, quick_mode() if quick is None else quick)


def check_system(system):
    if system not in SYSTEMS:
        raise RelaConfigError(f"unknown system {system!r}; choose one of {', '.join(SYSTEMS)}")
    return system
