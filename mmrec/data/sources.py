"""Dataset generators registered by name (the synthetic presets of ``utils/synth.py`` register here when
that module is imported: main.py, the tests and the benchmarks import it).  ``ensure_generated(config)``
generates a registered dataset that is missing or was made by an older generator; the command line calls
it before any data is read (the loader, ``RecDataset``, only loads), so the core never imports a
generator.  From Python: ``import utils.synth`` then ``ensure_generated(config)`` before loading a preset."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

Generator = Callable[[Path, str], Path]  # (data folder, name) -> the dataset folder, generated if needed
_GENERATORS: dict[str, Generator] = {}


def register_generator(names: Iterable[str], ensure: Generator) -> None:
    for name in names:
        _GENERATORS[name] = ensure


def generator(name: str) -> Generator | None:
    return _GENERATORS.get(name)


def generated_names() -> set[str]:
    return set(_GENERATORS)


def ensure_generated(config) -> Path | None:
    """The dataset folder of ``config``, generated first when its name is registered and the folder is
    missing or stale (a generated folder carries meta.json; a user's own folder of that name is left alone).
    None when the name is not registered."""
    from mmrec.data.dataset import _resolve_data_dir

    ensure = _GENERATORS.get(config["dataset"])
    if ensure is None:
        return None
    folder = _resolve_data_dir(config)
    if (folder / "meta.json").exists() or not folder.exists():
        ensure(folder.parent, config["dataset"])
    return folder
