"""Config precedence, per-dataset blocks, CLI overrides, strictness and grid enumeration."""
import pytest

from mmrec.config import ConfigError, grid_points, grid_size, load_config


def _write(tmp_path, overall, dataset=None, model=None):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "overall.yaml").write_text(overall)
    if dataset:
        (tmp_path / "dataset" / "ds.yaml").write_text(dataset)
    if model:
        (tmp_path / "model" / "M.yaml").write_text(model)
    return tmp_path


def test_precedence_overall_dataset_model_block_cli(tmp_path):
    cdir = _write(tmp_path, "a: 1\nb: 1\nc: 1\nd: 1\ne: 1\nseed: 999\nhyper_parameters: [seed]\n",
                  "b: 2\nc: 2\nd: 2\ne: 2\n",
                  "c: 3\nd: 3\ne: 3\ndataset_overrides:\n  ds: {d: 4, e: 4}\n  other: {d: 9}\n")
    cfg = load_config("M", "ds", ["e=5"], config_dir=cdir)
    assert [cfg[k] for k in "abcde"] == [1, 2, 3, 4, 5]
    other = load_config("M", "other", config_dir=cdir)
    assert other["d"] == 9 and other["b"] == 1  # no dataset yaml for 'other': overall's value


def test_cli_values_are_yaml_and_unknown_keys_suggest(tmp_path):
    cdir = _write(tmp_path, "learning_rate: 0.001\nflag: false\ntopk: [5, 10]\nseed: 1\n")
    cfg = load_config("M", "ds", ["learning_rate=5e-4", "flag=true", "topk=[1, 2]"], config_dir=cdir)
    assert cfg["learning_rate"] == 5e-4 and cfg["flag"] is True and cfg["topk"] == [1, 2]
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config("M", "ds", ["learnin_rate=1"], config_dir=cdir)
    with pytest.raises(ConfigError, match="did you mean 'flag'"):
        cfg["flga"]


def test_grid_enumeration_seed_included_last_key_fastest(tmp_path):
    cdir = _write(tmp_path, "seed: [999, 1]\nhyper_parameters: [seed]\n", None,
                  "x: [1, 2, 3]\ny: [a, b]\nz: 0\nhyper_parameters: [x, y]\n")
    cfg = load_config("M", "ds", config_dir=cdir)
    assert cfg["hyper_parameters"] == ["seed", "x", "y"]
    assert grid_size(cfg) == 12
    points = [p for p, _ in grid_points(cfg)]
    assert points[0] == {"seed": 999, "x": 1, "y": "a"} and points[1] == {"seed": 999, "x": 1, "y": "b"}
    assert points[-1] == {"seed": 1, "x": 3, "y": "b"}
    # --set on a grid key fixes it (grid shrinks); a list sets a new grid
    fixed = load_config("M", "ds", ["x=2", "seed=999"], config_dir=cdir)
    assert fixed["hyper_parameters"] == ["y"] and fixed["x"] == 2 and grid_size(fixed) == 2
    regrid = load_config("M", "ds", ["x=[7, 8]", "seed=5"], config_dir=cdir)
    assert [p["x"] for p, _ in grid_points(regrid)] == [7, 7, 8, 8]
    for _, c in grid_points(regrid):
        assert isinstance(c["x"], int) and c["hyper_parameters"] == []


def test_grid_block_is_switched_on_by_grid(tmp_path):
    cdir = _write(tmp_path, "seed: 999\nhyper_parameters: [seed]\n", None,
                  "reg: 0.1\ngrid:\n  reg: [0.1, 0.01]\n")
    single = load_config("M", "ds", config_dir=cdir)
    assert single["reg"] == 0.1 and grid_size(single) == 1
    grid = load_config("M", "ds", grid=True, config_dir=cdir)
    assert grid["hyper_parameters"] == ["reg"] and grid_size(grid) == 2


def test_dataset_block_with_unknown_key_is_an_error(tmp_path):
    cdir = _write(tmp_path, "seed: 1\n", None, "alpha: 1\ndataset_overrides:\n  ds: {alpah: 2}\n")
    with pytest.raises(ConfigError, match="alpah.*did you mean 'alpha'"):
        load_config("M", "ds", config_dir=cdir)


def test_shipped_configs_resolve_for_every_model_and_dataset():
    from mmrec.registry import available_models

    for name in available_models():
        for ds in ("mini", "baby", "sports", "clothing", "elec"):
            cfg = load_config(name, ds)
            assert cfg["model"] == name
            load_config(name, ds, grid=True)


@pytest.mark.parametrize("setting, fragment", [
    ("learning_rate=abc", "learning_rate='abc' (--set): expected a number"),
    ("n_layers=2.5", "n_layers=2.5 (--set): expected an integer"),
    ("epochs=0", "epochs=0 (--set): expected an integer >= 1"),
    ("valid_metric=hit@20", "expected METRIC@K"),
    ("valid_metric=recall@7", "K in topk"),
    ("use_gpu=yes please", "expected true or false"),
    ("split=temporal", "one of x_label, random"),
])
def test_bad_values_are_one_line_naming_key_value_and_source(setting, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("LightGCN", "mini", [setting])
    assert fragment in str(err.value)


def test_values_are_converted_to_their_defaults_type_and_yaml_sources_are_named(tmp_path):
    cfg = load_config("LightGCN", "mini", ["learning_rate=1", "seed=[1, 2]"])
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["seed"] == [1, 2] and cfg["hyper_parameters"] == ["seed"]
    cdir = _write(tmp_path, "epochs: 10\nseed: 1\n", None, "epochs: 2.5\n")
    with pytest.raises(ConfigError, match=r"epochs=2.5 \(.*M.yaml\): expected an integer"):
        load_config("M", "ds", config_dir=cdir)


def test_declared_rules_name_key_value_rule_and_source():
    from mmrec.config import Config, ConfigError, check_declared, check_rule

    check_rule("k", 3, (">=", 1), "x.yaml")
    check_rule("p", 0.0, ("between", (0, 1)), "x.yaml")
    check_rule("fam", ["a"], ("subset", ("a", "b")), "x.yaml")
    for value, rule, expected in ((0, (">=", 1), "k=0 (x.yaml): expected an integer >= 1"),
                                  (0.0, (">", 0), "k=0.0 (x.yaml): expected a number > 0"),
                                  (1.5, ("between", (0, 1)), "k=1.5 (x.yaml): expected a number in [0, 1]"),
                                  ("c", ("in", ("a", "b")), "k='c' (x.yaml): expected one of a, b"),
                                  (["c"], ("subset", ("a", "b")), "expected a non-empty list drawn from a, b")):
        with pytest.raises(ConfigError) as err:
            check_rule("k", value, rule, "x.yaml")
        assert expected in str(err.value)
    # a grid key: every value is checked, and the message names where the value came from
    cfg = Config({"k": [1, 0], "hyper_parameters": ["k"]}, {"k": "--set"})
    with pytest.raises(ConfigError, match=r"k=0 \(--set\)"):
        check_declared(cfg, {"k": (">=", 1)}, "M")
    check_declared(Config({"other": 1}), {"k": (">=", 1)}, "M")  # an undeclared key is skipped
