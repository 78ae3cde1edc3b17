"""The shipped example programs run end to end (examples/)."""
import importlib.util
from pathlib import Path

import mmalign

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mixed_example_aligns_a_language_model_and_a_diffusion_model_with_one_spec(tmp_path, capsys):
    example = _load("mixed_modalities")
    results = example.main(["--output-dir", str(tmp_path), "--steps", "4"])
    text, image = results["text"], results["image"]
    assert isinstance(text, mmalign.TrainResult) and isinstance(image, mmalign.TrainResult)
    assert type(text.model).__name__.startswith("PeftModel") and type(image.model).__name__ == "StableDiffusionPipeline"
    for result in (text, image):
        assert result.global_step == 4 and len([r for r in result.log if "loss" in r]) == 4
        assert result.details.get("reference_mode", "adapter") == "adapter"
    margins = [r["rewards/margins"] for r in text.log if "rewards/margins" in r]
    assert margins[0] == 0 and margins[-1] > 0  # the policy starts as its reference, then prefers the chosen groups
    assert (tmp_path / "text" / "final" / "adapter_config.json").exists()
    assert (tmp_path / "image" / "final" / "pytorch_lora_weights.safetensors").exists()
    printed = capsys.readouterr().out
    assert "text : PeftModelForCausalLM, 4 steps" in printed and "image: StableDiffusionPipeline, 4 steps" in printed
