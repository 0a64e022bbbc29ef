"""Task configurations (``configs/<task>.yaml`` on top of ``configs/_defaults.yaml``) and where the pipeline keeps
its files.

Every key of a configuration is checked against ``SCHEMA`` at every level: a misspelt key (``warmup_update``) or a
value of the wrong type is an error naming the file, the key and the accepted keys, never a silently ignored setting.
``configs/README.md`` documents the keys.

Paths come from the environment, with defaults under the project's ``work/`` folder (ignored by git):

    DATA_ROOT        downloads, extracted text, sentencepiece model, binarised data   (work/data)
    CHECKPOINT_ROOT  one folder per task and system                                    (work/checkpoints)
    RESULTS_ROOT     one JSON result (and the detokenised output) per task and system  (work/results)
    RELA_CONFIG_DIR  the task configurations                                           (configs/)
    QUICK=1          shrink data, model and updates to a smoke run of a minute or two on CPU, through the same
                     code; quick runs live in folders of their own (<task>-quick) and never mix with real ones.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from ..attention_types import QKV_BIAS_INITS
from ..errors import RelaConfigError
from ..systems import SYSTEMS

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- the schema

class ListOf:
    def __init__(self, item: Any):
        self.item = item


class OneOf:
    """A string out of ``choices``."""

    def __init__(self, *choices: str):
        self.choices = choices


class MapOf:
    """A mapping with free keys (``keys``: the accepted ones, if limited) whose values follow ``value``."""

    def __init__(self, value: Any, keys: tuple[str, ...] | None = None):
        self.value, self.keys = value, keys


NUMBER = (int, float)
SCALAR = (str, int, float)

DOWNLOAD = {
    "url": str,
    "urls": ListOf(str),  # an archive split into pieces, concatenated in this order
    "md5": str,
    "sha256": str,
    "file": str,  # the local file name, when the address's is not unique
    "recipes": ListOf(str),  # public recipes that use this address and these members (see configs/README.md)
    "note": str,
}
ITEM = {  # one corpus of a split: where each side comes from
    "download": str,  # both sides from one download ...
    "src_download": str,  # ... or each side from its own
    "tgt_download": str,
    "src": str,  # the archive member holding each side (omitted: the download is the text itself)
    "tgt": str,
    "format": str,
    "src_column": int,
    "tgt_column": int,
}
TRAIN_KEYS = {
    "arch": str,
    "tokens_per_update": int,  # kept on any number of devices (train.py)
    "max_tokens": int,  # per device, at most
    "lr": NUMBER,
    "warmup_updates": int,
    "warmup_init_lr": NUMBER,
    "max_update": int,
    "dropout": NUMBER,
    "attention_dropout": NUMBER,
    "activation_dropout": NUMBER,
    "label_smoothing": NUMBER,
    "weight_decay": NUMBER,
    "clip_norm": NUMBER,
    "attn_qkv_bias_init": OneOf(*QKV_BIAS_INITS),  # transformer_rela's --attn-qkv-bias-init
    "save_interval_updates": int,
    "keep_interval_updates": int,
    "keep_last_epochs": int,
    "validate_interval_updates": int,
    "log_interval": int,
    "seed": int,
    "extra": ListOf(SCALAR),  # more fairseq-train options, verbatim
}
# what a tuning grid may vary: settings that change the trained model, or (evaluate) only how it is decoded
TUNABLE_TRAIN_KEYS = ("lr", "warmup_updates", "warmup_init_lr", "max_update", "dropout", "attention_dropout",
                      "activation_dropout", "label_smoothing", "weight_decay", "clip_norm", "attn_qkv_bias_init")
TUNABLE_EVALUATE_KEYS = ("lenpen", "beam", "max_len_a", "max_len_b")
# train settings that do not change the trained weights (how often to log, how many old checkpoints to keep), and
# max_update, which only says where training stops: a run may go on to a larger one. The others make a run's identity.
BOOKKEEPING_TRAIN_KEYS = ("keep_interval_updates", "keep_last_epochs", "log_interval", "max_update")
EVALUATE_KEYS = {"average_last": int, "beam": int, "lenpen": NUMBER, "max_tokens": int, "max_len_a": NUMBER,
                 "max_len_b": int, "tokenized_bleu": bool}
TASK_KEYS = {
    "description": str,
    "src": str,
    "tgt": str,
    "data": {
        "downloads": MapOf(DOWNLOAD),
        "train": ListOf(ITEM),
        "valid": ListOf(ITEM),
        "test": ListOf(ITEM),
        "sacrebleu": {"test_set": str, "langpair": str},  # how sacrebleu -t names the test set, where it knows it
        "test_name": str,  # the test set's name otherwise
        "max_train_sentences": int,
        "max_valid_sentences": int,
        "max_test_sentences": int,
        "generator": str,
        "sizes": {"train": int, "valid": int, "test": int},
        "seed": int,
    },
    "clean": {"max_tokens": int, "max_ratio": NUMBER},
    "sentencepiece": {  # sentencepiece trainer options
        "vocab_size": int,
        "model_type": str,
        "character_coverage": NUMBER,
        "input_sentence_size": int,
        "user_defined_symbols": ListOf(str),
        "byte_fallback": bool,
        "split_digits": bool,
        "normalization_rule_name": str,
        "max_sentence_length": int,
    },
    "train": TRAIN_KEYS,
    "evaluate": EVALUATE_KEYS,
    "compare": {  # scripts/compare.sh
        "heatmap_sentences": ListOf(int),  # test sentences whose cross-attention is plotted
        "speed_updates": int,  # fairseq-train updates timed per system and round
        "speed_sentences": int,  # test sentences decoded per system and round
        "speed_rounds": int,
    },
    "paper": MapOf(NUMBER, keys=tuple(SYSTEMS)),
    # one system's own settings on top of train and evaluate: {rela_g: {train: {lr: 0.002}, evaluate: {lenpen: 1.0}}}
    "systems": MapOf({"train": TRAIN_KEYS, "evaluate": EVALUATE_KEYS}, keys=tuple(SYSTEMS)),
    "tune": {  # scripts/tune.sh: each system trained at every point of the grid, chosen on the validation set
        "grid": {
            "train": MapOf(ListOf(SCALAR), keys=TUNABLE_TRAIN_KEYS),  # trained: one run per combination
            "evaluate": MapOf(ListOf(SCALAR), keys=TUNABLE_EVALUATE_KEYS),  # decoding only, on each run
        },
    },
}
SCHEMA = dict(TASK_KEYS, quick=TASK_KEYS)  # `quick`: overrides applied with QUICK=1, any key of a task
TUNED_FILE = "tuned.json"  # tune.sh's choice per system, in RESULTS_ROOT/<task>/tune/
REQUIRED_KEYS = ("description", "src", "tgt", "data", "sentencepiece.vocab_size", "train.arch",
                 "train.tokens_per_update", "train.max_tokens", "train.seed", "evaluate.average_last", "evaluate.beam",
                 "evaluate.lenpen", "evaluate.max_tokens")


def _type_name(spec: Any) -> str:
    if isinstance(spec, tuple):
        return " or ".join(t.__name__ for t in spec)
    if isinstance(spec, dict):
        return "a mapping"
    if isinstance(spec, (ListOf, MapOf)):
        return "a list" if isinstance(spec, ListOf) else "a mapping"
    return spec.__name__


def check_schema(value: Any, spec: Any, where: str, path: str) -> None:
    """Raise a RelaConfigError naming ``path`` (the file), the key and the accepted keys or type."""
    def fail(message: str) -> None:
        raise RelaConfigError(f"{path}: {message}")

    if isinstance(spec, dict) or isinstance(spec, MapOf):
        if not isinstance(value, dict):
            fail(f"{where or 'the file'} should be a mapping of settings, got {type(value).__name__} {value!r}")
        for key, item in value.items():
            key_where = f"{where}.{key}" if where else str(key)
            accepted = list(spec) if isinstance(spec, dict) else spec.keys
            if accepted is not None and key not in accepted:
                fail(f"unknown key {key_where!r}; accepted keys "
                     f"{'under ' + repr(where) if where else 'at the top level'}: {', '.join(accepted)}")
            check_schema(item, spec[key] if isinstance(spec, dict) else spec.value, key_where, path)
        return
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            fail(f"{where} should be a list, got {type(value).__name__} {value!r}")
        for i, item in enumerate(value):
            check_schema(item, spec.item, f"{where}[{i}]", path)
        return
    if isinstance(spec, OneOf):
        if value is not None and value not in spec.choices:
            fail(f"{where} = {value!r} is not one of {', '.join(spec.choices)}")
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if value is not None and not ok:
        fail(f"{where} = {value!r} should be {_type_name(spec)}")


# --------------------------------------------------------------------------- tasks

def config_dir() -> str:
    return os.environ.get("RELA_CONFIG_DIR") or os.path.join(PROJECT_ROOT, "configs")


def available_tasks() -> list[str]:
    directory = config_dir()
    if not os.path.isdir(directory):
        raise RelaConfigError(f"no task configurations at {directory}: run the scripts from a checkout of "
                              "rela-fairseq or set RELA_CONFIG_DIR")
    return sorted(name[:-5] for name in os.listdir(directory) if name.endswith(".yaml") and not name.startswith("_"))


def quick_mode() -> bool:
    value = os.environ.get("QUICK", "0").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise RelaConfigError(f"QUICK={value!r}: use QUICK=1 for a smoke run or QUICK=0 (default)")


def merge(base: dict, override: dict | None) -> dict:
    """Recursive dict merge: override's values win, nested dicts are merged."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def output_root(variable: str, default_name: str) -> str:
    """DATA_ROOT, CHECKPOINT_ROOT or RESULTS_ROOT, else work/<default_name> in the project."""
    return os.path.abspath(os.environ.get(variable) or os.path.join(PROJECT_ROOT, "work", default_name))


def parse_set_option(text: str) -> tuple[str, str, Any]:
    """``train.max_update=3000`` -> ("train", "max_update", 3000): one ``--set`` of compare, tune, train, evaluate
    and reproduce, checked like a config's key (section, key, type)."""
    import yaml

    where, has_value, value_text = text.partition("=")
    section, _, key = where.partition(".")
    sections = {"train": TRAIN_KEYS, "evaluate": EVALUATE_KEYS}
    if not has_value or section not in sections or not key:
        raise RelaConfigError(f"--set {text!r}: give SECTION.KEY=VALUE with SECTION train or evaluate, e.g. "
                              "--set train.max_update=3000")
    if key not in sections[section] or key in ("seed", "extra"):
        accepted = [k for k in sections[section] if k not in ("seed", "extra")]
        raise RelaConfigError(f"--set {text!r}: unknown key {key!r} under {section}; accepted: {', '.join(accepted)}")
    value = yaml.safe_load(value_text)
    check_schema(value, sections[section][key], f"{section}.{key}", "--set")
    return section, key, value


def format_value(value: Any) -> str:
    """A setting's value as names and tables show it: 0.002, 300, 1e-07."""
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Setting:
    """One system's settings on a task: the task's shared ``train`` and ``evaluate`` settings with the system's own on
    top (the config's ``systems``, tune.sh's choice, or a point of the tuning grid)."""

    train: dict
    evaluate: dict
    overrides: dict  # {"train": {...}, "evaluate": {...}}: only what differs from the task's shared setting
    source: str  # where the overrides come from: shared, config, tuned, config+tuned or grid

    @property
    def tag(self) -> str:
        """The training overrides as a run's name carries them (``lr=0.002,warmup_updates=600``; '' for none), in the
        order of the config's keys: runs of other training settings never share a folder."""
        train = self.overrides["train"]
        return ",".join(f"{key}={format_value(train[key])}" for key in TRAIN_KEYS if key in train)

    def describe(self) -> str:
        """``lr 0.002, lenpen 1`` or ``shared``: the overrides, for logs and tables."""
        items = [f"{key} {format_value(value)}" for section in ("train", "evaluate")
                 for key, value in self.overrides[section].items()]
        return ", ".join(items) or "shared"

    def identity(self) -> dict:
        """What makes a run's weights: the training settings but the bookkeeping ones (run.json records it; a resume
        refuses checkpoints trained otherwise)."""
        return {key: value for key, value in self.train.items() if key not in BOOKKEEPING_TRAIN_KEYS}


class Task:
    """One task's settings, with QUICK=1 overrides applied, and its paths."""

    def __init__(self, name: str, settings: dict, quick: bool):
        self.name, self.quick = name, quick
        self.settings = merge(settings, settings.get("quick")) if quick else settings
        self.settings.pop("quick", None)
        self.src, self.tgt = settings["src"], settings["tgt"]
        tag = f"{name}-quick" if quick else name
        self.data_dir = os.path.join(output_root("DATA_ROOT", "data"), tag)
        self.checkpoint_root = os.path.join(output_root("CHECKPOINT_ROOT", "checkpoints"), tag)
        self.results_dir = os.path.join(output_root("RESULTS_ROOT", "results"), tag)
        self.use_tuned = True  # compare --shared-setting turns tune.sh's choices off
        self.command_line: dict = {"train": {}, "evaluate": {}}  # --set train.max_update=3000: on top of every system
        self._tuned: dict | None = None

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    def path(self, *parts: str) -> str:
        return os.path.join(self.data_dir, *parts)

    @property
    def bin_dir(self) -> str:
        return self.path("bin")

    # ----------------------------------------------------------------------- one system's settings

    @property
    def tune_dir(self) -> str:
        return os.path.join(self.results_dir, "tune")

    def tuned(self) -> dict:
        """tune.sh's choice per system (``{system: {"train": {...}, "evaluate": {...}}}``), {} before tuning."""
        if self._tuned is None:
            import json

            path = os.path.join(self.tune_dir, TUNED_FILE)
            self._tuned = {}
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    self._tuned = {system: {section: chosen.get(section, {}) for section in ("train", "evaluate")}
                                   for system, chosen in json.load(f)["systems"].items()}
        return self._tuned

    def setting(self, system: str, point: dict | None = None, tuned: bool | None = None) -> Setting:
        """``system``'s settings: the shared ones, then the config's ``systems.<system>``, then either a grid
        ``point`` ({"train": {...}, "evaluate": {...}}) or tune.sh's choice (unless ``tuned`` is False or
        ``use_tuned`` is off). A value the config pins wins over a tuned one (tune.sh never tunes it for that
        system); ``--set`` on the command line (``command_line``) wins over all."""
        own = (self.get("systems") or {}).get(system) or {}
        overrides = {section: dict(own.get(section) or {}) for section in ("train", "evaluate")}
        sources = ["config"] if any(overrides.values()) else []
        if point is not None:
            for section in overrides:
                overrides[section].update(point.get(section) or {})
            sources = ["grid"]
        elif (self.use_tuned if tuned is None else tuned) and system in self.tuned():
            for section, chosen in self.tuned()[system].items():
                for key, value in chosen.items():
                    overrides[section].setdefault(key, value)
            sources.append("tuned")
        if any(self.command_line.values()):
            for section in overrides:
                overrides[section].update(self.command_line[section])
            sources.append("--set")
        shared = {"train": self["train"], "evaluate": self["evaluate"]}
        overrides = {section: {key: value for key, value in values.items() if shared[section].get(key) != value}
                     for section, values in overrides.items()}
        return Setting(train=merge(shared["train"], overrides["train"]),
                       evaluate=merge(shared["evaluate"], overrides["evaluate"]), overrides=overrides,
                       source="+".join(sources) if any(overrides.values()) else "shared")

    # ----------------------------------------------------------------------- where a run's files go

    def run_name(self, system: str, seed: int | None = None, setting: Setting | None = None) -> str:
        """``system`` for the shared setting and the config's own seed; ``system@lr=0.002`` for other training
        settings (``Setting.tag``); ``-seedN`` after it for another seed (scripts/compare.sh --seeds)."""
        tag = (setting or self.setting(system)).tag
        name = f"{system}@{tag}" if tag else system
        return name if seed is None or seed == self["train"].get("seed", 1) else f"{name}-seed{seed}"

    def checkpoint_dir(self, system: str, seed: int | None = None, setting: Setting | None = None) -> str:
        return os.path.join(self.checkpoint_root, self.run_name(system, seed, setting))

    def result_path(self, system: str, seed: int | None = None, setting: Setting | None = None) -> str:
        return os.path.join(self.results_dir, f"{self.run_name(system, seed, setting)}.json")


def read_yaml(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        try:
            settings = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise RelaConfigError(f"{path}: not valid YAML: {exc}") from None
    check_schema(settings if settings is not None else {}, SCHEMA, "", path)
    return settings or {}


def load_task(name: str, quick: bool | None = None) -> Task:
    """A task's settings: configs/_defaults.yaml, then configs/<name>.yaml on top (nested keys merge)."""
    tasks = available_tasks()
    if name not in tasks:
        raise RelaConfigError(f"unknown task {name!r}; choose one of {', '.join(tasks)} "
                              f"(one file per task in {config_dir()})")
    path = os.path.join(config_dir(), f"{name}.yaml")
    own = read_yaml(path)
    defaults_path = os.path.join(config_dir(), "_defaults.yaml")
    settings = merge(read_yaml(defaults_path), own) if os.path.exists(defaults_path) else own
    missing = [key for key in REQUIRED_KEYS if _lookup(settings, key) is None]
    if missing:
        raise RelaConfigError(f"{path}: missing keys {', '.join(missing)}, in the file or in _defaults.yaml (required: "
                              f"{', '.join(REQUIRED_KEYS)})")
    for tune_settings in (settings.get("tune"), (settings.get("quick") or {}).get("tune")):
        _check_grid((tune_settings or {}).get("grid") or {}, path)
    data = settings["data"]
    if not data.get("generator"):
        absent = [key for key in ("downloads", "train", "valid", "test") if not data.get(key)]
        if absent:
            raise RelaConfigError(f"{path}: data needs {', '.join(absent)} (or a generator)")
        _check_items(data, path)
    return Task(name, settings, quick_mode() if quick is None else quick)


def _check_grid(grid: dict, path: str) -> None:
    """Each grid key's values: a non-empty list without repeats, each of the key's own type."""
    for section, keys in (("train", TRAIN_KEYS), ("evaluate", EVALUATE_KEYS)):
        for key, values in (grid.get(section) or {}).items():
            where = f"tune.grid.{section}.{key}"
            if not values:
                raise RelaConfigError(f"{path}: {where} is empty; give at least one value")
            for i, value in enumerate(values):
                check_schema(value, keys[key], f"{where}[{i}]", path)
            if len(set(values)) != len(values):
                raise RelaConfigError(f"{path}: {where} = {values} names a value twice")


def _lookup(settings: dict, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _check_items(data: dict, path: str) -> None:
    from .download import local_name

    downloads = data["downloads"]
    saved_as: dict[str, str] = {}
    for name, entry in downloads.items():
        if not entry.get("url") and not entry.get("urls"):
            raise RelaConfigError(f"{path}: download {name!r} has no url (or urls)")
        other = saved_as.setdefault(local_name(entry), name)
        if other != name:
            raise RelaConfigError(f"{path}: downloads {other!r} and {name!r} would both be saved as "
                                  f"{local_name(entry)!r}: give one of them its own 'file' name")
    for split in ("train", "valid", "test"):
        for i, item in enumerate(data[split]):
            where = f"data.{split}[{i}]"
            for side in ("src", "tgt"):
                name = item_download(item, side)
                if name is None:
                    raise RelaConfigError(f"{path}: {where} names no download for its {side} side (give 'download', "
                                          f"or '{side}_download')")
                if name not in downloads:
                    raise RelaConfigError(f"{path}: {where} names download {name!r}; the config defines "
                                          f"{', '.join(downloads)}")


def data_fingerprint(task: Task) -> str | None:
    """What the task's prepared data was made from (written by prepare), or None if it is not prepared."""
    import json

    path = task.path("fingerprint.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["fingerprint"]


def data_files_digest(task: Task) -> str | None:
    """A digest of what training reads and decoding writes with: the binarised data's dictionaries and its copy of
    the sentencepiece model. The fingerprint says what the data was made from; this says what it is (sentencepiece
    can give another vocabulary from the same settings), or None if the data is not binarised."""
    import hashlib

    digest = hashlib.sha256()
    for name in (f"dict.{task.src}.txt", f"dict.{task.tgt}.txt", "spm.model"):
        path = os.path.join(task.bin_dir, name)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def item_download(item: dict, side: str) -> str | None:
    """The download one side of a config item reads: ``<side>_download``, else ``download``."""
    return item.get(f"{side}_download") or item.get("download")
