"""Config files, command-line overrides and the dataclass boundary (snapjax/config.py)."""

from __future__ import annotations

import dataclasses
import pathlib
import textwrap

import pytest

from snapjax import cli
from snapjax.config import ConfigError, as_config, from_config, load_config, to_json

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = {"world_vae.py": ("cpu", "accel"), "world_teacher.py": ("cpu", "accel"),
           "sd15_finetune.py": ("pod", "gpu", "cpu")}


@dataclasses.dataclass(frozen=True)
class Section:
    lr: float = 1e-3
    steps: int = 10
    name: str = "adam"
    flag: bool = False
    shape: tuple[int, ...] = (2, 4)
    gamma: float | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(textwrap.dedent("""\
        # snapjax train --config exp.py --workdir /tmp/x
        import ml_collections
        from snapjax.config import as_config
        from tests.test_config import Section

        def get_config(arg="small"):
            config = ml_collections.ConfigDict()
            config.opt = as_config(Section(lr=1e-4 if arg == "small" else 1e-2))
            config.seed = 0
            return config
        """))
    return path


def test_variant_and_typed_overrides(config_file):
    config = load_config(f"{config_file}:big", [
        "--config.opt.lr=3e-4", "--config.opt.steps", "7", "config.opt.flag=true",
        "--config.opt.shape=(1,8)", "--config.opt.gamma=5", "--config.opt.name=sgd"])
    section = from_config(Section, config.opt, "opt")
    assert section == Section(lr=3e-4, steps=7, name="sgd", flag=True, shape=(1, 8), gamma=5.0)
    assert isinstance(section.gamma, float)
    assert load_config(str(config_file)).opt.lr == 1e-4  # default variant


def test_unknown_key_names_it_and_suggests(config_file):
    with pytest.raises(ConfigError, match=r"config\.opt\.lrr does not exist.*config\.opt\.lr"):
        load_config(str(config_file), ["--config.opt.lrr=1"])
    with pytest.raises(ConfigError, match=r"config\.nope\.x does not exist"):
        load_config(str(config_file), ["--config.nope.x=1"])


def test_type_mismatch_is_clear(config_file):
    with pytest.raises(ConfigError, match=r"config\.opt\.steps='1\.5'.*int"):
        load_config(str(config_file), ["--config.opt.steps=1.5"])
    with pytest.raises(ConfigError, match=r"config\.opt\.flag='maybe'.*bool"):
        load_config(str(config_file), ["--config.opt.flag=maybe"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(str(config_file), ["--config.opt=1"])


def test_config_is_locked(config_file):
    config = load_config(str(config_file))
    with pytest.raises(AttributeError):
        config.opt.new_key = 1


def test_from_config_checks_keys_and_values():
    with pytest.raises(ConfigError, match=r"config\.opt: unknown key\(s\) \['extra'\]"):
        from_config(Section, {**as_config(Section).to_dict(), "extra": 1}, "opt")
    with pytest.raises(ConfigError, match=r"config\.opt: steps must be >= 1"):
        from_config(Section, {"steps": 0}, "opt")


def test_missing_file_and_bad_override_form(tmp_path, config_file):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.py"))
    with pytest.raises(ConfigError, match="overrides look like"):
        load_config(str(config_file), ["--lr=1"])


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_load_and_validate(name):
    from snapjax.checkpoint import CheckpointConfig
    from snapjax.data.pipeline import DataConfig
    from snapjax.sharding import MeshConfig
    from snapjax.train.loop import TrainConfig
    from snapjax.train.optim import OptimConfig

    path = REPO / "configs" / name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "--config configs/" + name in first, first
    for variant in SHIPPED[name]:
        config = load_config(f"{path}:{variant}")
        for cls, key in ((TrainConfig, "train"), (MeshConfig, "mesh"), (OptimConfig, "opt"),
                         (CheckpointConfig, "checkpoint")):
            from_config(cls, config[key], key)
        DataConfig.from_config(config.data)
        assert to_json(config)["objective"] == config.objective


def test_cli_rejects_unknown_key(capsys):
    code = cli.main(["train", "--config", str(REPO / "configs" / "world_vae.py"),
                     "--workdir", "/tmp/unused", "--config.opt.learning_rate=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "config.opt.learning_rate does not exist" in err and "opt.lr," in err
