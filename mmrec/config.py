"""Layered configuration.

Precedence (later wins): configs/overall.yaml < configs/dataset/<d>.yaml < configs/model/<M>.yaml
< the model yaml's ``dataset_overrides: {<d>: {...}}`` block < command-line ``--set key=value``
(values parsed as YAML).

Grids, MMRec style: ``hyper_parameters: [a, b]`` names keys whose values are lists; a run walks the
cartesian product (``seed`` included; the last key varies fastest).  Shipped model yamls keep scalar
defaults for a single run and their search space in a ``grid:`` block, which ``main.py grid`` (or
``--grid``) switches on.  ``--set key=value`` on a grid key fixes it (the grid shrinks); a YAML list on
a grid key sets a new grid.  Unknown keys are an error with a close-match suggestion.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 / 5E3 as floats (PyYAML's YAML 1.1 reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A configuration problem, reported as one line before anything is built."""


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Config:
    """A strict mapping: reading a key that no layer defines is an error with a suggestion."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str] | None = None):
        self._values = dict(values)
        self.sources = dict(sources or {})  # key -> where its value came from (a yaml file or --set)

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            raise ConfigError(f"config has no key {key!r}{_suggest(key, self._values)}; "
                              "add it to the model yaml or pass --set")
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._values[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)

    def copy(self) -> "Config":
        return Config(copy.deepcopy(self._values), self.sources)

    def __repr__(self) -> str:
        return f"Config({self._values!r})"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = yaml_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def parse_set(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({err})") from err
    return key, value


def _merge_hyper(base: list, extra) -> list:
    out = list(base)
    for name in extra or []:
        if name not in out:
            out.append(name)
    return out


# Ranges and allowed sets of the harness keys (overall.yaml); a key's type is the type of its default
# in the first layer that defines it (overall < dataset < model yaml), so every model key is typed too.
RANGES: dict[str, tuple[str, Any]] = {
    "epochs": (">=", 1), "train_batch_size": (">=", 1), "eval_batch_size": (">=", 1), "eval_step": (">=", 1),
    "max_steps_per_epoch": (">=", 0), "optimizer_impl": ("in", ("fused", "foreach")),
    "stopping_step": (">=", 0), "stopping_start_epoch": (">=", 0), "learning_rate": (">", 0), "weight_decay": (">=", 0),
    "embedding_size": (">=", 1),
    "n_layers": (">=", 0), "num_threads": (">=", 0), "save_topk": (">=", 0), "metric_decimals": (">=", 0),
    "learning_rate_floor": (">=", 0), "weight_averaging": ("between", (0, 0.9999)), "split": ("in", ("x_label", "random")),
    "similarity_whitening": (">=", 0), "similarity_smoothing": (">=", 0),
    "optimizer_empty_grad": ("in", ("skip", "zero")), "learner": ("in", ("adam", "adamw", "sgd", "adagrad")),
}
METRIC_NAMES = ("recall", "ndcg", "precision", "map")


def _type_name(default) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list"}.get(type(default), type(default).__name__)


def _check_value(key: str, value, default, where: str) -> Any:
    """``value`` converted to the type of ``default`` (int -> float allowed), or a ConfigError."""
    def fail(expected: str):
        raise ConfigError(f"{key}={value!r} ({where}): expected {expected}")

    if default is None or value is None and key not in RANGES:
        return value  # untyped (default null), or a model's optional setting switched off with null
    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail(_type_name(default))
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            fail(_type_name(default))
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(_type_name(default))
        value = float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        fail(_type_name(default))
    elif isinstance(default, list) and not isinstance(value, list):
        fail(_type_name(default))
    if key in RANGES:
        check_rule(key, value, RANGES[key], where)
    return value


def check_rule(key: str, value, rule: tuple[str, Any], where: str) -> None:
    """One declared rule: ("in", choices) | ("subset", choices) for a list | (">=", n) | (">", n) |
    ("between", (lo, hi)), both ends included.  A miss is a ConfigError naming key, value, rule and source."""
    op, bound = rule
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if op == "in":
        ok, expected = value in bound, f"one of {', '.join(map(str, bound))}"
    elif op == "subset":
        ok = isinstance(value, list) and bool(value) and all(v in bound for v in value)
        expected = f"a non-empty list drawn from {', '.join(map(str, bound))}"
    elif op == "between":
        ok, expected = number and bound[0] <= value <= bound[1], f"a number in [{bound[0]}, {bound[1]}]"
    elif op in (">=", ">"):
        ok = number and (value >= bound if op == ">=" else value > bound)
        expected = f"{'an integer' if isinstance(bound, int) and isinstance(value, int) else 'a number'} {op} {bound}"
    else:
        raise ValueError(f"unknown rule {rule!r} for {key}")
    if not ok:
        raise ConfigError(f"{key}={value!r} ({where}): expected {expected}")


def check_declared(config, schema: dict[str, tuple[str, Any]], owner: str) -> None:
    """A model's declared allowed values (``config_schema``) on a resolved configuration; a grid key's
    every value is checked.  Keys the configuration does not hold, and null values, are skipped."""
    grid_keys = set(config.get("hyper_parameters") or [])
    sources = getattr(config, "sources", {})
    for key, rule in schema.items():
        if key not in config:
            continue
        value = config[key]
        where = sources.get(key, f"{owner}'s configuration")
        for v in value if key in grid_keys and isinstance(value, list) else [value]:
            if v is not None:  # null switches an optional setting off
                check_rule(key, v, rule, where)


def _check_protocol(values: dict, source: dict) -> None:
    """Cross-key checks of the evaluation protocol (valid_metric among the computed metrics)."""
    topk, metrics = values.get("topk"), values.get("metrics")
    if isinstance(topk, list) and not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in topk):
        raise ConfigError(f"topk={topk!r} ({source.get('topk')}): expected a list of integers >= 1")
    if isinstance(metrics, list) and any(m not in METRIC_NAMES for m in metrics):
        raise ConfigError(f"metrics={metrics!r} ({source.get('metrics')}): allowed {', '.join(METRIC_NAMES)}")
    vm = values.get("valid_metric")
    if isinstance(vm, str) and isinstance(topk, list) and isinstance(metrics, list):
        name, _, k = vm.lower().partition("@")
        if name not in metrics or not k.isdigit() or int(k) not in topk:
            raise ConfigError(f"valid_metric={vm!r} ({source.get('valid_metric')}): expected METRIC@K with METRIC "
                              f"in metrics {metrics} and K in topk {topk}")


def load_config(model: str, dataset: str, overrides: list[str] | dict[str, Any] | None = None,
                grid: bool = False, config_dir: Path | None = None,
                model_yaml: Path | None = None, extra_yamls: list[Path] | None = None) -> Config:
    """Resolve the layered configuration of one (model, dataset) pair.  ``extra_yamls`` (``--config``)
    are layered after the model yaml, in order, like it (own keys, ``dataset_overrides``, ``grid``)."""
    cdir = Path(config_dir) if config_dir else CONFIG_DIR
    values: dict[str, Any] = {}
    declared: dict[str, tuple[Any, str]] = {}  # key -> (default in the first layer that defines it, file)
    source: dict[str, str] = {}  # key -> where its value comes from
    hyper: list[str] = []
    layers = [cdir / "overall.yaml", cdir / "dataset" / f"{dataset}.yaml"]
    layers.append(Path(model_yaml) if model_yaml else cdir / "model" / f"{model}.yaml")
    extras = [Path(p) for p in extra_yamls or []]
    for path in extras:
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
    model_grid: dict[str, list] = {}
    for path in layers + extras:
        model_like = path.parent.name == "model" or path in extras
        if not path.exists():
            if path.parent.name == "dataset":
                continue  # a dataset without a yaml uses MMRec's default field names
            if path.parent.name == "model":
                continue  # a user's own model (-m pkg.module:Class) may have no yaml
            raise ConfigError(f"missing config file {path}")
        data = _read_yaml(path)
        hyper = _merge_hyper(hyper, data.pop("hyper_parameters", []))
        per_dataset = data.pop("dataset_overrides", None) or {}
        if model_like:
            model_grid = {**model_grid, **(data.pop("grid", None) or {})}
        for key, value in data.items():
            declared.setdefault(key, (value, str(path)))
            source[key] = str(path)
        values.update(data)
        if model_like and dataset in per_dataset:
            block = per_dataset[dataset] or {}
            unknown = [k for k in block if k not in values and k != "grid"]
            if unknown:
                raise ConfigError(f"{path}: dataset_overrides.{dataset} sets unknown key {unknown[0]!r}"
                                  f"{_suggest(unknown[0], values)}")
            if "grid" in block:
                model_grid = {**model_grid, **(block.pop("grid") or {})}
            values.update(block)
            source.update({k: f"{path} dataset_overrides.{dataset}" for k in block})
    if grid:
        for key, options in model_grid.items():
            if not isinstance(options, list):
                raise ConfigError(f"grid.{key} must be a list of values")
            values[key] = options
            hyper = _merge_hyper(hyper, [key])
    values["model"] = model
    values["dataset"] = dataset
    # command line
    items = overrides.items() if isinstance(overrides, dict) else (parse_set(s) for s in overrides or [])
    for key, value in items:
        if key == "hyper_parameters":
            hyper = list(value or [])
            continue
        if key not in values:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, values)}; "
                              "known keys are listed by `python main.py show -m MODEL -d DATASET`")
        values[key] = value
        source[key] = "--set"
    grid_capable = set(hyper) | set(model_grid)
    # a grid key keeps a list of 2+ values; a one-element list or a scalar fixes it (the grid shrinks)
    grid_keys = []
    for key in hyper:
        if key not in values:
            raise ConfigError(f"hyper_parameters names {key!r} but no layer sets it{_suggest(key, values)}")
        if isinstance(values[key], list) and len(values[key]) == 1:
            values[key] = values[key][0]
        if isinstance(values[key], list):
            grid_keys.append(key)
    values["hyper_parameters"] = grid_keys
    # every value has its default's type (and range): one line naming the key, the value and its source
    for key, (default, path) in declared.items():
        if key in ("hyper_parameters", "model", "dataset"):
            continue
        where, value = source.get(key, path), values[key]
        if isinstance(default, list) and key in grid_capable:  # a grid declared in a yaml: typed by its items
            default = default[0] if default else None
        if isinstance(value, list) and (key in grid_keys or key in grid_capable) and not isinstance(default, list):
            values[key] = [_check_value(key, v, default, where) for v in value]
        else:
            values[key] = _check_value(key, value, default, where)
    _check_protocol(values, source)
    return Config(values, source)


def grid_points(config: Config) -> Iterator[tuple[dict[str, Any], Config]]:
    """Cartesian product over ``config['hyper_parameters']`` (last key fastest), as in MMRec."""
    keys = list(config.get("hyper_parameters") or [])
    lists = [config[k] for k in keys]
    for combo in itertools.product(*lists):
        point = dict(zip(keys, combo))
        cfg = config.copy()
        for k, v in point.items():
            cfg[k] = v
        cfg["hyper_parameters"] = []
        yield point, cfg


def grid_size(config: Config) -> int:
    n = 1
    for k in config.get("hyper_parameters") or []:
        n *= len(config[k])
    return n
