"""Model name -> class.  Models are found in ``models/`` by class name (case-insensitive, any file), or
given as ``package.module:ClassName`` or ``path/to/file.py:ClassName`` to run a researcher's own
GeneralRecommender from anywhere (its keys in a ``--config`` yaml)."""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import pkgutil
import sys
from pathlib import Path

from mmrec.recommender import AbstractRecommender


class RegistryError(ValueError):
    pass


_BROKEN: dict[str, str] = {}


def available_models() -> dict[str, type]:
    """Every GeneralRecommender subclass defined in a module of ``models/``.  A module that fails to
    import is skipped (and named in the error if the requested model is not found)."""
    import models

    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(models.__path__):
        try:
            module = importlib.import_module(f"models.{info.name}")
        except Exception as err:  # a broken model file must not break every other model
            _BROKEN[info.name] = f"{type(err).__name__}: {err}"
            continue
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if (issubclass(obj, AbstractRecommender) and obj.__module__ == module.__name__
                    and not obj.__dict__.get("abstract_model", False)):
                found[name] = obj
    return found


def _import_own(module_name: str, name: str):
    """``package.module`` from sys.path, or ``path/to/file.py`` from the file system."""
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise RegistryError(f"model {name!r}: no such file {path}")
        loaded = sys.modules.get(path.stem)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            return loaded  # imported once: every later lookup gets the same class
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise RegistryError(f"cannot import {module_name!r} for model {name!r}: {err}. Python looks in "
                            f"{', '.join(p or '.' for p in sys.path[:4])}, ...: run from the folder that holds "
                            f"the package, add it to PYTHONPATH, or pass the file: -m path/to/{module_name.split('.')[-1]}.py:"
                            f"{name.split(':', 1)[1]}") from err


def get_model(name: str) -> type:
    if ":" in name:
        module_name, cls_name = name.split(":", 1)
        module = _import_own(module_name, name)
        cls = getattr(module, cls_name, None)
        if cls is None or not (inspect.isclass(cls) and issubclass(cls, AbstractRecommender)):
            raise RegistryError(f"{name!r}: {module_name} has no GeneralRecommender subclass {cls_name!r}")
        return cls
    models = available_models()
    by_lower = {k.lower(): v for k, v in models.items()}
    key = name.lower().replace("-", "").replace("_", "")
    for k, v in by_lower.items():
        if k.replace("_", "") == key:
            return v
    close = difflib.get_close_matches(name, list(models), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    broken = "".join(f"; models/{m}.py failed to import ({e})" for m, e in _BROKEN.items())
    raise RegistryError(f"unknown model {name!r}{hint}; available: {', '.join(sorted(models))}; "
                        f"or pass package.module:ClassName{broken}")


def canonical_name(name: str) -> str:
    if ":" in name:
        return name.split(":", 1)[1]
    return get_model(name).__name__
