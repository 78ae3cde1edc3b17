"""The typed configuration of ``python -m mmalign.image.train`` (YAML → dataclasses, validated)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mmalign.engine.config import TrainingConfig

__all__ = ["ImageTrainConfig", "ImageModelConfig", "ImageDataConfig", "ImageObjectiveConfig", "DiffusionConfig",
           "GenerationConfig"]


@dataclass
class ImageModelConfig:
    """Which diffusion model and how it is fine-tuned."""

    pretrained: str = field(default="", metadata={"help": "diffusers pipeline folder or hub name (SD 1.x/2.x layout, "
                                                          "or a pixel-space UNet folder without vae/)"})
    revision: Optional[str] = field(default=None, metadata={"help": "hub revision"})
    variant: Optional[str] = field(default=None, metadata={"help": "weights variant, e.g. fp16"})
    finetuning: Literal["lora", "full"] = field(
        default="lora", metadata={"help": "lora: adapters on the UNet attention, reference = adapters disabled (one "
                                          "UNet in memory); full: every UNet weight, reference = a frozen copy"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha; null = rank (scale 1)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "UNet modules that get LoRA"})
    attention: Literal["auto", "xformers", "sdpa"] = field(
        default="auto", metadata={"help": "auto: xformers on CUDA when installed, else torch SDPA"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute UNet activations in backward"})
    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample"]] = field(
        default=None, metadata={"help": "override the scheduler's prediction type (null = the pipeline's)"})
    frozen_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the frozen VAE and text encoder"})
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
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1; got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")


@dataclass
class ImageDataConfig:
    """Where the preference groups come from and how images are prepared."""

    path: str = field(default="", metadata={"help": "JSONL / Parquet file, group folder, or datasets name/folder"})
    format: Literal["groups", "pick_a_pic"] = field(
        default="groups", metadata={"help": "groups: {prompt, chosen: [...], rejected: [...]}; pick_a_pic: "
                                            "{caption, jpg_0, jpg_1, label_0}, ties dropped"})
    split: str = field(default="train", metadata={"help": "split for datasets.load_dataset"})
    prompt_field: str = field(default="prompt", metadata={"help": "prompt column"})
    chosen_field: str = field(default="chosen", metadata={"help": "chosen image(s) column"})
    rejected_field: str = field(default="rejected", metadata={"help": "rejected image(s) column"})
    bin_field: Optional[str] = field(default=None, metadata={"help": "integer bin column (causal_dpo)"})
    max_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N rows"})
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
class ImageObjectiveConfig:
    """The preference objective on the log-ratio surrogate ρ = −(e_θ − e_ref) (SPEC §7)."""

    name: str = field(default="dpo", metadata={"help": "any mmalign objective: dpo ipo rdpo cdpo hinge fdpo mdpo "
                                                       "mipo cnrpo causal_dpo sft"})
    beta: Optional[float] = field(default=None, metadata={"help": "the objective's β on ρ (Diffusion-DPO: β = β_d/2)"})
    beta_d: Optional[float] = field(
        default=None, metadata={"help": "Diffusion-DPO's β_d as in the diffusers script's beta_dpo (SD 1.5: "
                                        "2000-5000); sets β = β_d/2. Give beta or beta_d, not both; neither = 5000"})
    params: dict[str, Any] = field(default_factory=dict, metadata={"help": "other hyperparameters of the objective "
                                                                           "(eps, gamma, alphas, lam, divergence...)"})
    triggers: list[str] = field(default_factory=list, metadata={"help": "cnrpo trigger strings appended to prompts"})
    trigger_mode: Literal["append", "prepend"] = field(default="append", metadata={"help": "how triggers attach"})

    def __post_init__(self) -> None:
        if self.beta is not None and self.beta_d is not None:
            raise ValueError("set exactly one of objective.beta (β on ρ) and objective.beta_d (diffusers' beta_dpo; "
                             "β = β_d/2)")
        value = self.beta if self.beta is not None else self.beta_d
        if value is not None and not value > 0:
            raise ValueError(f"objective.beta/beta_d must be > 0; got {value}")

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return float(self.beta)
        return float(self.beta_d if self.beta_d is not None else DEFAULT_BETA_D) / 2.0


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

    output_dir: str = field(default="runs/image", metadata={"help": "run folder (metrics.jsonl, checkpoints/, final/)"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "null, 'latest' or a checkpoint "
                                                                                  "folder"})
    model: ImageModelConfig = field(default_factory=ImageModelConfig, metadata={"help": "the diffusion model"})
    data: ImageDataConfig = field(default_factory=ImageDataConfig, metadata={"help": "the preference data"})
    objective: ImageObjectiveConfig = field(default_factory=ImageObjectiveConfig,
                                            metadata={"help": "the objective"})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig, metadata={"help": "training noise"})
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={"help": "evaluation samples"})
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(learning_rate=1e-5),
                                     metadata={"help": "optimisation, logging, checkpoints"})

    def __post_init__(self) -> None:
        if not self.model.pretrained:
            raise ValueError("model.pretrained is required (a diffusers pipeline folder or hub name)")
        if not self.data.path:
            raise ValueError("data.path is required")
        if self.training.eval_steps and not self.generation.prompts:
            raise ValueError(f"training.eval_steps: {self.training.eval_steps} does nothing without evaluation: the "
                             "image evaluation generates generation.prompts, which is empty; set "
                             "training.eval_steps: 0 or give generation.prompts")
