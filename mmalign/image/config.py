"""The typed configuration of ``python -m mmalign.image.train`` (YAML → dataclasses, validated)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from mmalign.engine.config import TrainingConfig
from mmalign.image.rounds_config import RoundsConfig
from mmalign.engine.sections import (
    OLD_DATA_KEYS,
    OLD_MODEL_KEYS,
    OLD_TOP_KEYS,
    LoraConfig,
    ObjectiveConfig,
    check_objective,
)

__all__ = ["ImageTrainConfig", "ImageModelConfig", "ImageDataConfig", "ImageObjectiveConfig", "ImageReferenceConfig",
           "DiffusionConfig", "GenerationConfig", "default_image_lora"]


@dataclass
class ImageModelConfig:
    """Which diffusion model."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {**OLD_MODEL_KEYS, "frozen_dtype": "use model.dtype"}

    name_or_path: Optional[str] = field(
        default=None, metadata={"help": "diffusers pipeline folder or hub name (SD 1.x/2.x layout, or a pixel-space "
                                        "UNet folder without vae/); may be omitted when the call passes pipeline=..."})
    revision: Optional[str] = field(default=None, metadata={"help": "hub revision"})
    variant: Optional[str] = field(default=None, metadata={"help": "weights variant, e.g. fp16"})
    dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the frozen VAE and text encoder (the UNet trains in float32 "
                                             "under training.mixed_precision)"})
    attention: Literal["auto", "xformers", "sdpa"] = field(
        default="auto", metadata={"help": "auto: xformers on CUDA when installed, else torch SDPA"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute UNet activations in backward"})
    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample"]] = field(
        default=None, metadata={"help": "override the scheduler's prediction type (null = the pipeline's)"})
    text_conditioner: Optional[str] = field(
        default=None, metadata={"code_hook": True, "help": "'package.module:callable' returning a prompts -> encoder_hidden_states "
                                        "module; null = the pipeline's tokenizer + text encoder"})
    text_conditioner_kwargs: dict[str, Any] = field(default_factory=dict,
                                                    metadata={"help": "keyword arguments of text_conditioner"})

    # SDXL / SD3 / FLUX and memory (mmalign.image.families; docs/image.md "Model families")
    family: Literal["auto", "sd", "sdxl", "sd3", "flux"] = field(
        default="auto", metadata={"help": "model family; auto = detected from model_index.json"})
    weights_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the backbone's frozen base weights (LoRA parameters stay "
                                             "float32); sdxl/sd3/flux"})
    vae: Optional[str] = field(default=None, metadata={"help": "another VAE folder, e.g. an fp16-safe SDXL VAE"})
    vae_tiling: bool = field(default=False, metadata={"help": "encode/decode large images in VAE tiles"})
    cache_text_embeddings: bool = field(
        default=False, metadata={"help": "encode every prompt once, then unload the text encoders (sdxl/sd3/flux)"})
    text_encoder_lora: bool = field(
        default=False, metadata={"help": "sdxl: LoRA (the lora section's r/alpha/dropout) on both text encoders too"})
    use_t5: bool = field(default=True, metadata={"help": "sd3: load the optional T5 encoder (false = zeros)"})
    max_sequence_length: Optional[int] = field(default=None, metadata={"help": "T5 tokens (null = pipeline's)"})
    optimizer: Literal["adamw", "adamw_8bit"] = field(
        default="adamw", metadata={"help": "adamw_8bit needs bitsandbytes (optional extra 'bnb')"})
    allow_code_hooks: bool = field(default=False, metadata={"help": "allow text_conditioner to import a module "
                                                                    "outside mmalign (runs that code)"})

    def __post_init__(self) -> None:
        if self.text_conditioner is not None:
            from mmalign.code_hooks import check_code_hook

            check_code_hook(self.text_conditioner, key="model.text_conditioner", allow=self.allow_code_hooks,
                            allow_key="model.allow_code_hooks")


def default_image_lora() -> LoraConfig:
    # the diffusers Diffusion-DPO LoRA recipe: rank 8 on the UNet attention projections, scale 1
    return LoraConfig(enabled=True, r=8, alpha=None, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ImageReferenceConfig:
    """The reference denoiser e_ref."""

    mode: Literal["auto", "adapter", "model"] = field(
        default="auto", metadata={"help": "adapter: the UNet with its LoRA adapters disabled (one UNet in memory); "
                                          "model: a frozen copy of the initial UNet; auto: adapter under LoRA, else "
                                          "model"})


@dataclass
class ImageDataConfig:
    """Where the preference groups come from and how images are prepared."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_DATA_KEYS

    train: Optional[str] = field(
        default=None, metadata={"help": "JSONL / Parquet file, group folder, or datasets name/folder; may be omitted "
                                        "when the call passes train_dataset=..."})
    format: Literal["groups", "pick_a_pic"] = field(
        default="groups", metadata={"help": "groups: {prompt, chosen: [...], rejected: [...]}; pick_a_pic: "
                                            "{caption, jpg_0, jpg_1, label_0}, ties dropped"})
    train_split: str = field(default="train", metadata={"help": "split of a dataset folder or hub dataset"})
    eval: Optional[str] = field(
        default=None, metadata={"help": "held-out preference groups (same forms as data.train), evaluated with fixed "
                                        "noise every training.eval_steps; null = none (eval_dataset=... in a call)"})
    eval_split: str = field(default="test", metadata={"help": "split of the eval dataset folder or hub dataset"})
    prompt_field: str = field(default="prompt", metadata={"help": "prompt column"})
    chosen_field: str = field(default="chosen", metadata={"help": "chosen image(s) column"})
    rejected_field: str = field(default="rejected", metadata={"help": "rejected image(s) column"})
    bin_field: Optional[str] = field(default=None, metadata={"help": "integer bin column (causal_dpo)"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N rows"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N eval rows"})
    resolution: int = field(default=512, metadata={"help": "square training resolution (resize + crop)"})
    center_crop: bool = field(default=True, metadata={"help": "center crop (else top-left)"})
    random_flip: bool = field(default=False, metadata={"help": "random horizontal flips"})
    convert_images: bool = field(default=False, metadata={"help": "convert grayscale/RGBA/palette images instead "
                                                                  "of rejecting them"})
    allow_ragged_groups: bool = field(default=False, metadata={"help": "allow group sizes to differ between rows"})
    cache_latents: bool = field(default=False, metadata={"help": "encode every image once with the VAE (posterior "
                                                                 "mean and std kept in memory) and reuse them"})

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8; got {self.resolution}")
        if self.cache_latents and self.random_flip:
            raise ValueError("cache_latents and random_flip cannot both be true (flips happen before the VAE)")


DEFAULT_BETA_D = 5000.0  # SD 1.5's usual Diffusion-DPO β_d (docs/image.md)


@dataclass
class ImageObjectiveConfig(ObjectiveConfig):
    """The preference objective on the log-ratio surrogate ρ = −(e_θ − e_ref) (SPEC §7): ``name`` and its
    hyperparameters, flat (``{name: mdpo, beta_d: 5000}``). ``beta_d`` is Diffusion-DPO's β_d (the diffusers
    script's ``beta_dpo``; SD 1.5: 2000-5000) and sets β = β_d/2; neither beta nor beta_d: β_d = 5000."""

    hyperparameters: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "the objective's keyword arguments, written directly in the section: objective.beta (β on "
                          "ρ) or objective.beta_d (= 2β), objective.eps, objective.alphas, ..."})
    triggers: list[str] = field(default_factory=list, metadata={"help": "cnrpo trigger strings appended to prompts"})
    trigger_mode: Literal["append", "prepend"] = field(default="append", metadata={"help": "how triggers attach"})

    def __post_init__(self) -> None:
        hp = self.hyperparameters
        if "beta" in hp and "beta_d" in hp:
            raise ValueError("objective: set exactly one of beta (β on ρ) and beta_d (diffusers' beta_dpo; β = β_d/2)")
        value = hp.get("beta", hp.get("beta_d"))
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"objective.beta/beta_d must be a number > 0; got {value!r}")
        check_objective(self.name, self.objective_kwargs())

    @property
    def resolved_beta(self) -> float:
        hp = self.hyperparameters
        if "beta" in hp:
            return float(hp["beta"])
        return float(hp.get("beta_d", DEFAULT_BETA_D)) / 2.0

    def objective_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``mmalign.objective``: β resolved from beta/beta_d, the rest as given."""
        kwargs = {k: v for k, v in self.hyperparameters.items() if k not in ("beta", "beta_d")}
        return {"beta": self.resolved_beta, **kwargs}


@dataclass
class DiffusionConfig:
    """How training noise is drawn."""

    caption_dropout: float = field(default=0.0, metadata={"help": "probability of training a group on the empty "
                                                                  "prompt (CFG); shared by policy and reference"})
    timestep_min: int = field(default=0, metadata={"help": "lowest training timestep"})
    timestep_max: Optional[int] = field(default=None, metadata={"help": "exclusive upper bound; null = T"})
    latent_sampling: Literal["sample", "mode"] = field(default="sample", metadata={"help": "VAE posterior sample or "
                                                                                           "its mean"})
    vae_batch_size: Optional[int] = field(default=4, metadata={"help": "images per VAE encoder call (bounds the "
                                                                       "encoder's full-resolution activations); null "
                                                                       "= the whole batch at once"})

    # flow matching (sd3, flux): timestep density, shift, FLUX guidance (mmalign.image.families.flow)
    weighting_scheme: Literal["logit_normal", "mode", "uniform"] = field(
        default="logit_normal", metadata={"help": "flow matching: timestep density"})
    logit_mean: float = field(default=0.0, metadata={"help": "logit_normal mean"})
    logit_std: float = field(default=1.0, metadata={"help": "logit_normal std"})
    mode_scale: float = field(default=1.29, metadata={"help": "mode sampling scale"})
    shift: Optional[float] = field(default=None, metadata={"help": "timestep shift; null = the scheduler's"})
    guidance_scale: float = field(default=1.0, metadata={"help": "flux: value fed to the guidance embedding"})

    def __post_init__(self) -> None:
        if self.vae_batch_size is not None and self.vae_batch_size < 1:
            raise ValueError(f"diffusion.vae_batch_size: invalid value {self.vae_batch_size!r}; expected an integer "
                             ">= 1 or null")


@dataclass
class GenerationConfig:
    """Images generated at each evaluation (a PNG grid per evaluation under output_dir/samples/)."""

    prompts: list[str] = field(default_factory=list, metadata={"help": "prompts; empty = no generation"})
    images_per_prompt: int = field(default=2, metadata={"help": "images per prompt (one grid row per prompt)"})
    scheduler: Literal["ddim", "dpm_solver"] = field(default="ddim", metadata={"help": "sampler"})
    num_inference_steps: int = field(default=25, metadata={"help": "sampling steps"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance scale (1 = off)"})
    seed: int = field(default=0, metadata={"help": "seed of the first image; image i uses seed + i"})
    resolution: Optional[int] = field(default=None, metadata={"help": "image side; null = data.resolution"})


@dataclass
class ImageTrainConfig:
    """Diffusion preference training (Diffusion-DPO, mDPO, ... on ρ = −(e_θ − e_ref))."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_TOP_KEYS

    model: ImageModelConfig = field(default_factory=ImageModelConfig, metadata={"help": "the diffusion model"})
    data: ImageDataConfig = field(default_factory=ImageDataConfig, metadata={"help": "the preference data"})
    objective: ImageObjectiveConfig = field(default_factory=ImageObjectiveConfig,
                                            metadata={"help": "the objective"})
    lora: LoraConfig = field(default_factory=default_image_lora,
                             metadata={"help": "LoRA adapters on the UNet (enabled: false = full fine-tuning)"})
    reference: ImageReferenceConfig = field(default_factory=ImageReferenceConfig,
                                            metadata={"help": "the reference denoiser"})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig, metadata={"help": "training noise"})
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={"help": "evaluation samples"})
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(learning_rate=1e-5),
                                     metadata={"help": "optimisation, logging, checkpoints"})
    output_dir: str = field(default="runs/image", metadata={"help": "run folder (metrics.jsonl, checkpoints/, final/)"})
    rounds: Optional[RoundsConfig] = field(default=None, metadata={
        "help": "online rounds instead of a fixed data set: generate k images per prompt with the policy, score them "
                "with rounds.reward, train on chosen/rejected groups, repeat (mmalign.image.online; data.train unused)"})

    def __post_init__(self) -> None:
        if self.lora.initial_adapter:
            raise ValueError("lora.initial_adapter: continuing a saved adapter is not supported on the image side; "
                             "pass a pipeline with the adapter loaded (pipeline=...) or train a fresh one")
        if self.reference.mode == "adapter" and not self.lora.enabled:
            raise ValueError("reference.mode: 'adapter' needs lora.enabled: true (the reference is the UNet with its "
                             "adapters disabled); use 'model' (a frozen copy) for full fine-tuning")
        if self.reference.mode == "model" and self.lora.enabled:
            raise ValueError("reference.mode: 'model' with lora.enabled: the reference of LoRA training is the UNet "
                             "with adapters disabled; use mode adapter (or auto)")
