"""mmalign.config: typed loading, overrides, errors that name file/key/value/allowed, help rendering."""
import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import pytest
import yaml

from mmalign.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    config_help,
    load_config,
    save_config,
    to_dict,
)
from mmalign.engine import TrainingConfig


@dataclass
class Inner:
    size: int = field(default=3, metadata={"help": "how big"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "which mode"})

    def __post_init__(self):
        if self.size < 0:
            raise ValueError(f"inner.size: invalid value {self.size}; expected >= 0")


@dataclass
class Outer:
    name: str = field(metadata={"help": "required name"})
    rate: float = field(default=0.5, metadata={"help": "a rate"})
    tags: list[str] = field(default_factory=list, metadata={"help": "free tags"})
    inner: Inner = field(default_factory=Inner, metadata={"help": "nested section"})
    optional_inner: Optional[Inner] = field(default=None, metadata={"help": "absent unless given"})
    where: Optional[Path] = None
    either: Union[int, list[int]] = 1
    extras: dict[str, float] = field(default_factory=dict)
    flag: bool = False


def test_load_from_yaml_dict_and_instance(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nrate: 1e-5\ninner: {size: 4}\nwhere: /tmp/a\neither: [1, 2]\n")
    cfg = load_config(Outer, path)
    assert cfg.rate == 1e-5  # PyYAML reads 1e-5 as a string; float fields accept it
    assert cfg.inner == Inner(size=4) and cfg.where == Path("/tmp/a") and cfg.either == [1, 2]
    assert load_config(Outer, to_dict(cfg)) == cfg
    assert load_config(Outer, cfg) == cfg
    saved = save_config(cfg, tmp_path / "out" / "resolved.yaml")
    assert yaml.safe_load(saved.read_text())["where"] == "/tmp/a"
    assert load_config(Outer, saved) == cfg


def test_overrides():
    cfg = load_config(Outer, {"name": "x"}, ["inner.size=7", "tags=[a, b]", "optional_inner.mode=b",
                                             "extras.alpha=0.25", "flag=true", "rate=3"])
    assert cfg.inner.size == 7 and cfg.tags == ["a", "b"] and cfg.optional_inner == Inner(mode="b")
    assert cfg.extras == {"alpha": 0.25} and cfg.flag is True and cfg.rate == 3.0
    with pytest.raises(ConfigError, match=r"unknown key 'inner.sise'; allowed keys under inner: size, mode"):
        load_config(Outer, {"name": "x"}, ["inner.sise=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(Outer, {"name": "x"}, ["inner.size"])


def test_errors_name_source_key_value_and_allowed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ninner: {mode: c}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: inner.mode: invalid value 'c'; expected one of 'a', 'b'"):
        load_config(Outer, path)
    path.write_text("name: x\ninner: {colour: red}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: inner.colour: unknown key; allowed keys under inner: size, mode"):
        load_config(Outer, path)
    path.write_text("rate: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: name: required key is missing; expected a string \(required name\)"):
        load_config(Outer, path)
    path.write_text("name: x\ninner: {size: -1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: inner.size: invalid value -1; expected >= 0"):
        load_config(Outer, path)
    path.write_text("name: x\ntags: [ok, [nested]]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: tags\[1\]: invalid value \['nested'\]; expected a string"):
        load_config(Outer, path)
    path.write_text("name: x\nflag: maybe\n")
    with pytest.raises(ConfigError, match=r"flag: invalid value 'maybe'; expected true/false"):
        load_config(Outer, path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_training_config_validation():
    with pytest.raises(ConfigError, match=r"training.batch_size: invalid value 0; expected an integer >= 1"):
        load_config(TrainingConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match=r"report_to\[0\]: invalid value 'mlflow'; expected one of 'jsonl'"):
        load_config(TrainingConfig, {"report_to": ["mlflow"]})
    with pytest.raises(ConfigError, match=r"training.max_steps: invalid value 0"):
        load_config(TrainingConfig, {"max_steps": 0})


def test_help_rendering_and_argparse(tmp_path):
    text = config_help(Outer)
    assert "inner.size (an integer, default 3): how big" in text
    assert "name (a string, required): required name" in text
    assert "optional_inner:" in text and "optional_inner.mode" in text
    parser = add_config_arguments(argparse.ArgumentParser())
    path = tmp_path / "c.yaml"
    path.write_text("name: y\n")
    args = parser.parse_args(["--config", str(path), "--set", "inner.size=9", "--set", "rate=0.1"])
    cfg = config_from_args(Outer, args)
    assert cfg.name == "y" and cfg.inner.size == 9 and cfg.rate == 0.1


def test_a_partial_section_keeps_the_parents_default_for_that_section():
    # ImageTrainConfig's training section defaults to TrainingConfig(learning_rate=1e-5); setting another key of
    # the section (in YAML, a dict or an override) must not fall back to TrainingConfig's own 5e-7.
    from mmalign.engine.config import TrainingConfig
    from mmalign.image.config import ImageTrainConfig
    from mmalign_experiments.debias.config import DebiasConfig

    required = {"model": {"name_or_path": "x"}, "data": {"train": "y"}}
    assert TrainingConfig().learning_rate != 1e-5
    config = load_config(ImageTrainConfig, {**required, "training": {"max_steps": 3}})
    assert config.training.learning_rate == 1e-5 and config.training.max_steps == 3
    config = load_config(ImageTrainConfig, required, ["training.seed=7"])
    assert config.training.learning_rate == 1e-5 and config.training.seed == 7
    debias = load_config(DebiasConfig, None, ["training.progress_bar=false"])
    assert debias.training.max_steps == DebiasConfig().training.max_steps > 0
    assert debias.training.learning_rate == DebiasConfig().training.learning_rate
    assert debias.training.progress_bar is False
    # dict-typed fields are replaced whole, and explicit values still win
    config = load_config(ImageTrainConfig, {**required, "objective": {"name": "rdpo", "beta": 2.0, "eps": 0.1},
                                            "training": {"learning_rate": 3e-4}})
    assert config.objective.hyperparameters == {"beta": 2.0, "eps": 0.1} and config.training.learning_rate == 3e-4


def test_yaml_boolean_words_read_back_as_the_choice_they_spell(tmp_path):
    # YAML 1.1 turns `no` into False; `mixed_precision: no` must still mean accelerate's "no".
    path = tmp_path / "train.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_config(TrainingConfig, path).mixed_precision == "no"
    assert load_config(TrainingConfig, {}, ["mixed_precision=no"]).mixed_precision == "no"
    # a boolean whose words are not among the choices is still an error, naming the value and the cause
    with pytest.raises(ConfigError, match=r"mixed_precision: invalid value True; expected one of 'no', 'fp16'.*"
                                          r"YAML reads yes/no/on/off/true/false as booleans"):
        load_config(TrainingConfig, {}, ["mixed_precision=yes"])
    with pytest.raises(ConfigError, match=r"inner.mode: invalid value False; expected one of 'a', 'b'"):
        load_config(Outer, {"name": "x", "inner": {"mode": False}})
