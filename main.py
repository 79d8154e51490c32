#!/usr/bin/env python3
"""Command line of the toolkit.

    python main.py -m MAGNET -d baby                       # train + evaluate (the default command)
    python main.py train -m LightGCN -d mini --set n_layers=3 --set learning_rate=5e-4
    python main.py grid -m LightGCN -d mini                # walk the model yaml's grid, pick by validation
    python main.py compare -m BPR,LightGCN,MAGNET -d mini,mid_synth --seeds 999,1,2   (or --splits 5)
    python main.py results saved/compare-...              # the table of a comparison or grid, also while it runs
    python main.py results saved/compare-... --paired     # + each model against the best, per test user
    python main.py recommend saved/MAGNET-baby-... --k 50  # top-K lists with scores from best.pth
    python main.py analyse saved/MAGNET-mini-...          # routing profile and dynamics (JSON + PNG)
    python main.py explain saved/MAGNET-mini-... --user 3 # why these items: per-pair routing mass
    python main.py plot RUN_DIR [RUN_DIR ...]              # learning curves of any runs
    python main.py show -m FREEDOM -d baby                 # the resolved configuration
    python main.py check -d baby                           # a dataset in full: statistics and every problem
    python main.py prepare mini                            # generate a synthetic dataset / load a real one
    python main.py models                                  # list the registered models
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

PAIRED_HELP = ("add a column per dataset: each model's ndcg@20 minus the best model's, per test user averaged "
               "over the shared seeds, with its 95%% bootstrap interval over users (reads the runs' top-K lists)")
COMMANDS = ("train", "grid", "compare", "results", "recommend", "analyse", "explain", "paired", "plot", "check",
            "show", "prepare", "models")


def _common(p: argparse.ArgumentParser, required: bool = True) -> None:
    note = " (not needed with --resume)" if not required else ""
    p.add_argument("-m", "--model", required=required,
                   help="model name (see `models`) or package.module:Class" + note)
    p.add_argument("-d", "--dataset", required=required,
                   help="dataset folder name under data_path (compare: comma-separated)" + note)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (value parsed as YAML); repeatable")
    p.add_argument("--gpu", action="store_true", help="use CUDA (same as --set use_gpu=true)")
    p.add_argument("--out", type=Path, help="output folder (default saved/<model>-<dataset>-<time>/)")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds")
    p.add_argument("--config", action="append", default=[], type=Path, metavar="YAML",
                   help="extra yaml layered after the model's (your model's own keys); repeatable")


def _parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1,
                   help="trainings at once on this machine (CPU threads split between them; one GPU each)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="ray: send the trainings to a Ray cluster (pip install 'ray>=2.9')")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="main.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    p = sub.add_parser("train", help="train and evaluate one model (walks the grid if one is active)")
    _common(p, required=False)
    p.add_argument("--grid", action="store_true", help="switch on the model yaml's grid")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR with its saved config (--set epochs=N extends it)")
    p = sub.add_parser("grid", help="grid search over the model yaml's grid, best by validation")
    _common(p, required=False)
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the grid in DIR with its saved config")
    _parallel(p)
    p = sub.add_parser("compare", help="several models side by side under identical splits and seeds")
    _common(p)
    p.add_argument("--seeds", default="999", help="comma-separated seeds (default 999)")
    p.add_argument("--splits", type=int, default=None,
                   help="use N fresh random 8:1:1 splits with the paper's seeds instead of x_label")
    p.add_argument("--efficiency", action="store_true",
                   help="add s/epoch, s/eval, peak memory and t95 per dataset to the table (Table 7)")
    p.add_argument("--paired", action="store_true", help=PAIRED_HELP)
    _parallel(p)
    p = sub.add_parser("results", help="print the table of a comparison or grid folder (also while it runs)")
    p.add_argument("folder", type=Path)
    p.add_argument("--paired", action="store_true", help=PAIRED_HELP)
    p = sub.add_parser("recommend", help="top-K lists with scores from a finished run's best.pth")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--k", type=int, default=50)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--users", type=Path, metavar="FILE", help="one user id per line (default: every user)")
    who.add_argument("--all", action="store_true", help="every user (the default)")
    p.add_argument("--out", type=Path, help="output TSV (default RUN_DIR/recommendations_topK.tsv)")
    p = sub.add_parser("show", help="print the resolved configuration")
    _common(p)
    p.add_argument("--grid", action="store_true")
    p = sub.add_parser("analyse", help="routing profile, reliance, families and dynamics of a routed run (PNG + JSON);"
                                       " --dv RUN --sv RUN: the DV-over-SV gain by visibility and activity bucket")
    p.add_argument("run_dir", type=Path, nargs="?")
    p.add_argument("--dv", type=Path, help="a MAGNET-DV run folder (with --sv)")
    p.add_argument("--sv", type=Path, help="a MAGNET-SV run folder on the same dataset and split")
    p.add_argument("--out", type=Path, help="folder for analysis.json and the figures (default RUN_DIR/analysis)")
    p = sub.add_parser("explain", help="why the user's top items: per-pair routing mass (table + heatmap)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--user", required=True, help="a user id (original id when the dataset maps ids)")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--item", help="explain this item for the user instead of the top-K")
    p = sub.add_parser("paired", help="two runs on one split: A - B per metric with a bootstrap interval over "
                                      "the evaluated users (is the gap larger than the test set's noise?)")
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--k", type=int, nargs="+", default=[20], help="cut-offs (default 20)")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    p = sub.add_parser("plot", help="learning curves of any runs, overlaid (PNG), and how far each chosen "
                                    "validation value stands above its curve")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="folder for the figures (default FIRST_RUN/plots)")
    p = sub.add_parser("check", help="check a dataset in full: Table 2 statistics and every problem")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("prepare", help="generate a synthetic preset, load a dataset, or build one from the raw "
                                       "Amazon files (prepare amazon --reviews ... --out data/NAME)")
    p.add_argument("dataset", help="a dataset name, or amazon")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reviews", type=Path, help="amazon: reviews_<Category>_5.json.gz (JSON lines)")
    p.add_argument("--meta", type=Path, help="amazon: meta_<Category>.json.gz (Python dict literals)")
    p.add_argument("--image-features", type=Path, help="amazon: image_features_<Category>.b (ASIN + 4096 float32)")
    p.add_argument("--out", type=Path, help="amazon: the dataset folder to write, e.g. data/baby2")
    p.add_argument("--text-model", default="sentence-transformers/all-MiniLM-L6-v2",
                   help="amazon: sentence-transformers model name or local path for text features, none, or "
                        "hash:D (a bag-of-words stand-in for smoke tests, not for results)")
    p.add_argument("--k-core", type=int, default=5, help="amazon: minimum interactions per user and item")
    p.add_argument("--split-seed", type=int, default=999, help="amazon: seed of the per-user 8:1:1 split")
    sub.add_parser("models", help="list the registered models")
    return ap


def _prepare_amazon(args) -> int:
    """prepare amazon: the raw files to data/NAME/ (and configs/dataset/NAME.yaml when absent), then check."""
    import shutil

    from mmrec.config import ConfigError, load_config
    from mmrec.data.check import main_check
    from utils.amazon import prepare_amazon, text_encoder

    if args.reviews is None or args.out is None:
        raise ConfigError("prepare amazon needs --reviews FILE and --out data/NAME (and --meta, --image-features)")
    for flag, path in (("--reviews", args.reviews), ("--meta", args.meta), ("--image-features", args.image_features)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if args.k_core < 1:
        raise ConfigError(f"--k-core {args.k_core}: expected an integer >= 1")
    encoder = None
    if str(args.text_model).lower() != "none":
        if args.meta is None:
            raise ConfigError("text features need --meta FILE (or --text-model none)")
        try:
            encoder = text_encoder(args.text_model)
        except (ImportError, ValueError) as err:
            raise ConfigError(str(err)) from None
    try:
        report = prepare_amazon(args.reviews, args.meta, args.image_features, args.out, encoder, args.k_core,
                                args.split_seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(" ".join(f"{k}={v}" for k, v in report.items()))
    name = args.out.name
    target = ROOT / "configs" / "dataset" / f"{name}.yaml"
    sets = [f"data_path={args.out.resolve().parent}"]
    missing = [k for k, present in (("vision_feature_file", args.image_features), ("text_feature_file", encoder))
               if present is None]
    if missing and not target.exists():  # other than the default file names: the loader must be told
        shutil.copyfile(args.out / f"{name}.yaml", target)
        print(f"wrote {target.relative_to(ROOT)} (no {' and no '.join(missing)})")
    sets += [f"{k}=null" for k in missing]
    config = load_config("BPR", name, sets)
    config["model"] = None
    return main_check(config)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "results":  # light: reads the store without loading torch, also while runs go on
        from mmrec.config import ConfigError
        from mmrec.results import show_results

        try:
            print(show_results(args.folder, paired=args.paired))
        except (FileNotFoundError, ConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command in ("train", "grid") and args.resume is None and (args.model is None or args.dataset is None):
        parser.error("the following arguments are required: -m/--model, -d/--dataset (or --resume DIR)")

    import utils.synth  # noqa: F401  (registers the synthetic presets: generated on first use)
    from mmrec.config import ConfigError, load_config
    from mmrec.data import DataError, RecDataset
    from mmrec.data.sources import ensure_generated
    from mmrec.quick_start import Interrupted, RunsFailed
    from mmrec.registry import RegistryError, available_models, canonical_name

    try:
        sets = list(getattr(args, "set", []) or [])
        if getattr(args, "gpu", False):
            sets.append("use_gpu=true")
        if args.command == "models":
            for name, cls in sorted(available_models().items()):
                doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
                print(f"{name:14s} {doc[0] if doc else ''}")
            return 0
        if args.command == "check":
            from mmrec.data.check import main_check

            config = load_config("BPR", args.dataset, sets)
            config["model"] = None  # every configured feature file is checked
            return main_check(config)
        if args.command == "prepare" and args.dataset == "amazon":
            return _prepare_amazon(args)
        if args.command == "prepare":
            config = load_config("BPR", args.dataset, sets)
            config["model"] = None  # not an ID-only model: check and load every configured feature file
            ensure_generated(config)  # a synthetic preset: generated (or regenerated when stale)
            print(RecDataset(config).summary())
            return 0
        if args.command == "show":
            import yaml

            config = load_config(canonical_name(args.model), args.dataset, sets, grid=args.grid,
                                 extra_yamls=args.config)
            print(yaml.safe_dump(config.to_dict(), sort_keys=True), end="")
            return 0
        from mmrec import quick_start

        if args.command == "paired":
            from mmrec.diagnostics import paired_runs

            if args.resamples < 1 or min(args.k) < 1:
                raise ConfigError(f"paired: --resamples {args.resamples} and --k {args.k} must be >= 1")
            print(paired_runs(args.run_a, args.run_b, args.split, tuple(args.k), args.resamples, args.seed))
            return 0
        if args.command in ("analyse", "explain", "plot"):
            from mmrec import diagnostics

            try:
                if args.command == "analyse" and (args.dv or args.sv):
                    if not (args.dv and args.sv):
                        raise ConfigError("analyse --dv RUN_DV needs --sv RUN_SV (and the other way round)")
                    print(diagnostics.dv_sv_gain(args.dv, args.sv, args.out))
                elif args.command == "analyse":
                    if args.run_dir is None:
                        raise ConfigError("analyse needs RUN_DIR (or --dv RUN_DV --sv RUN_SV)")
                    print(diagnostics.analyse_run(args.run_dir, args.out))
                elif args.command == "explain":
                    table, figure = diagnostics.explain_run(args.run_dir, args.user, args.topk, args.item)
                    print(table)
                    print(figure)
                else:
                    table = diagnostics.selection_table(args.run_dirs)
                    if table.count("\n") > 1:
                        print(table)
                    for path in diagnostics.plot_runs(args.run_dirs, args.out):
                        print(path)
            except ImportError as err:  # matplotlib, an optional extra
                raise ConfigError(str(err)) from None
            return 0
        if args.command == "recommend":
            print(quick_start.recommend_from_run(args.run_dir, args.k, args.users, args.out))
            return 0
        if getattr(args, "workers", 1) < 1:
            raise ConfigError(f"--workers {args.workers}: expected an integer >= 1")
        if args.command == "compare":
            models = [m.strip() for m in args.model.split(",") if m.strip()]
            datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
            try:
                seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
            res = quick_start.compare(models, datasets, seeds, args.splits, sets, args.out, overwrite=args.overwrite,
                                      extra_yamls=args.config, workers=args.workers, backend=args.backend,
                                      address=args.address, efficiency=args.efficiency, paired=args.paired)
        else:
            resume = getattr(args, "resume", None)
            out = resume or args.out
            if resume is not None and not Path(resume).is_dir():
                raise ConfigError(f"--resume {resume}: no such run folder")
            res = quick_start.run(args.model, args.dataset, sets, out,
                                  grid=(args.command == "grid" or getattr(args, "grid", False)),
                                  resume=resume is not None, overwrite=args.overwrite, extra_yamls=args.config,
                                  workers=getattr(args, "workers", 1), backend=getattr(args, "backend", "local"),
                                  address=getattr(args, "address", None))
        print(res["result_path"])
        return 0
    except (ConfigError, DataError, RegistryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop (e.g. while building graphs): nothing to resume
        print("interrupted", file=sys.stderr)
        return 130
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return 130
    except RunsFailed as err:  # the finished runs are stored and tabled; the message names the failures
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
