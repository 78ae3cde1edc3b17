"""The ``rounds:`` section is checked when the config loads, before any model, and names its key."""
import pytest

from mmalign.config import ConfigError
from mmalign.config.building import from_dict
from mmalign.image.config import ImageModelConfig, ImageTrainConfig
from mmalign.image.online import ImageOnlineConfig
from mmalign.image.rounds_config import ROUND_KEYS, RoundsConfig


def _train_config(**rounds):
    return {"model": {"name_or_path": "/nonexistent/pipeline"}, "output_dir": "unused",
            "rounds": {"prompts": ["a photo of a doctor"], **rounds}}


@pytest.mark.parametrize("rounds, message", [
    ({"k": 1}, "k >= 2"),
    ({"prompts": []}, "at least one training prompt"),
    ({"selection": "threshold"}, "needs a reward threshold"),
])
def test_a_bad_rounds_section_fails_at_load_naming_rounds(rounds, message):
    with pytest.raises(ConfigError, match=message) as caught:
        from_dict(ImageTrainConfig, _train_config(**rounds), source="train.yaml")
    assert "rounds" in str(caught.value)


def test_the_online_config_is_the_rounds_section_plus_model_and_training():
    online_only = {"model", "lora", "resolution", "objective", "diffusion", "training", "output_dir"}
    names = [f for f in ImageOnlineConfig.__dataclass_fields__]
    assert tuple(names[: len(ROUND_KEYS)]) == ROUND_KEYS and set(names[len(ROUND_KEYS):]) == online_only
    assert issubclass(ImageOnlineConfig, RoundsConfig)
    with pytest.raises(ValueError, match="k >= 2"):
        ImageOnlineConfig(prompts=["p"], k=1, model=ImageModelConfig(name_or_path="x"))
