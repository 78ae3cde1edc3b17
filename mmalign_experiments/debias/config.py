"""The typed configuration of ``python -m mmalign.image.debias`` (YAML → dataclasses, validated).

Defaults are the embedded run: the shipped 32×32 face model (``mmalign/image/assets/face_model``), the project's
classifiers, 50 occupations. ``configs/image/debias-sd15.yaml`` is the Stable Diffusion 1.5 recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from mmalign.engine.config import TrainingConfig
from mmalign.engine.sections import OLD_MODEL_KEYS, OLD_TOP_KEYS, LoraConfig

__all__ = ["DebiasConfig", "DebiasModelConfig", "OccupationsConfig", "SamplingConfig", "GroupsConfig",
           "ClassifierConfig", "MethodConfig", "EvaluationConfig", "default_methods"]


@dataclass
class DebiasModelConfig:
    """The text-to-image model to debias and how it is fine-tuned."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {**OLD_MODEL_KEYS, "frozen_dtype": "use model.dtype"}

    name_or_path: str = field(default="", metadata={"help": "diffusers pipeline folder or hub name; empty = the "
                                                            "shipped 32x32 face model"})
    revision: Optional[str] = field(default=None, metadata={"help": "hub revision"})
    variant: Optional[str] = field(default=None, metadata={"help": "weights variant, e.g. fp16"})
    text_conditioner: Optional[str] = field(
        default=None, metadata={"help": "'package.module:callable' text conditioner; null = the pipeline's own (the "
                                        "shipped face model uses the MiniLM encoder automatically)"})
    text_conditioner_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "its keyword arguments"})
    resolution: Optional[int] = field(default=None, metadata={"help": "image side; null = the UNet's sample_size × "
                                                                      "the VAE factor"})
    attention: Literal["auto", "xformers", "sdpa"] = field(default="auto", metadata={"help": "attention kernel"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute UNet activations in backward"})
    dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the frozen VAE and text encoder"})
    cache_latents: bool = field(default=False, metadata={"help": "VAE-encode every training image once (latent "
                                                                 "models)"})
    # SDXL / SD3 / FLUX only (mmalign.image.families; configs/image/debias-sdxl.yaml, debias-sd35.yaml)
    weights_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "sdxl/sd3/flux: dtype of the frozen backbone base (LoRA stays float32)"})
    vae: Optional[str] = field(default=None, metadata={"help": "sdxl/sd3/flux: another VAE folder (fp16-safe "
                                                               "SDXL VAE)"})
    vae_tiling: bool = field(default=False, metadata={"help": "sdxl/sd3/flux: encode/decode in VAE tiles"})
    cache_text_embeddings: bool = field(
        default=False, metadata={"help": "sdxl/sd3/flux: encode every prompt once, then unload the text encoders"})
    use_t5: bool = field(default=True, metadata={"help": "sd3: load the optional T5 encoder (false = zeros)"})
    max_sequence_length: Optional[int] = field(default=None, metadata={"help": "sd3/flux: T5 tokens (null = the "
                                                                               "pipeline's)"})


@dataclass
class OccupationsConfig:
    """Which occupations, and the split into training and held-out evaluation occupations."""

    path: Optional[str] = field(default=None, metadata={"help": "winogenerated occupations JSONL (occupation, "
                                                                "bls_pct_female); null = $MMALIGN_DATA_DIR/winogenerated/..., default ../shared/data from the cwd"})
    count: int = field(default=50, metadata={"help": "occupations, evenly spread over the BLS share of women"})
    names: list[str] = field(default_factory=list, metadata={"help": "explicit occupations (overrides count)"})
    eval_fraction: float = field(default=0.2, metadata={"help": "share held out for evaluation (never trained on)"})
    seed: int = field(default=0, metadata={"help": "seed of the split (stratified over the BLS share)"})

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"occupations.eval_fraction must be in (0, 1); got {self.eval_fraction}")
        if not self.names and self.count < 2:
            raise ValueError(f"occupations.count must be >= 2; got {self.count}")


@dataclass
class SamplingConfig:
    """How every image of the run is sampled (training groups and evaluation)."""

    scheduler: Literal["ddim", "dpm_solver", "pipeline"] = field(
        default="ddim", metadata={"help": "sampler: ddim or dpm_solver (sd); pipeline = the pipeline's own scheduler "
                                          "(sdxl, sd3, flux)"})
    num_inference_steps: int = field(default=10, metadata={"help": "sampling steps"})
    guidance_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance (1 = off)"})
    batch_size: int = field(default=64, metadata={"help": "images per sampling batch"})

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise ValueError("sampling.num_inference_steps and sampling.batch_size must be >= 1")


@dataclass
class GroupsConfig:
    """Preference groups: chosen = attribute-prompted images over race × gender, rejected = the base model's images
    for the plain prompt (thesis §3.6.2, SPEC §7)."""

    races: list[str] = field(default_factory=lambda: ["black", "white", "asian"], metadata={"help": "race groups"})
    genders: list[str] = field(default_factory=lambda: ["male", "female"], metadata={"help": "genders"})
    groups_per_occupation: int = field(default=1, metadata={"help": "preference groups per training occupation"})
    rejected_per_group: int = field(default=6, metadata={"help": "base images per rejected group (k_l)"})
    candidates_per_cell: int = field(default=3, metadata={"help": "attribute images drawn per race×gender cell; the "
                                                                  "first the classifier agrees with is kept"})
    # gender by default: on the embedded model the race filter kept 21 of 40 groups and mDPO did better on both
    # attributes with the 34 the gender filter keeps (docs/debias.md, "Which chosen groups")
    filter: Literal["attributes", "gender", "race", "none"] = field(
        default="gender", metadata={"help": "gender: keep a chosen image only if the classifier sees its requested "
                                            "gender (cells without one are dropped); attributes: gender and race; "
                                            "race: race only; none: keep the first candidate of every cell"})
    balance_genders: bool = field(
        default=True, metadata={"help": "after filtering, keep a race's cells only when every gender of that race "
                                        "has an image, so a chosen group holds as many images of each gender"})
    min_chosen: int = field(default=3, metadata={"help": "drop a group left with fewer chosen images"})
    seed: int = field(default=0, metadata={"help": "first sampling seed of the training images"})

    def __post_init__(self) -> None:
        from mmalign.image.fairface import GENDERS, RACE_GROUPS

        if not self.races or not self.genders:
            raise ValueError("groups.races and groups.genders must not be empty")
        for name, values, known in (("races", self.races, RACE_GROUPS), ("genders", self.genders, GENDERS)):
            unknown = [v for v in values if v not in known]
            if unknown or len(set(values)) != len(values):
                raise ValueError(f"groups.{name}: {values} must be distinct values of {list(known)} (the labels the "
                                 "classifiers predict)")
        for name in ("groups_per_occupation", "rejected_per_group", "candidates_per_cell", "min_chosen"):
            if getattr(self, name) < 1:
                raise ValueError(f"groups.{name} must be >= 1; got {getattr(self, name)}")
        if self.min_chosen > len(self.races) * len(self.genders):
            raise ValueError(f"groups.min_chosen={self.min_chosen} exceeds the {len(self.races) * len(self.genders)} "
                             "race×gender cells")


@dataclass
class ClassifierConfig:
    """The demographic classifier that filters the chosen groups and scores every evaluation image."""

    name: str = field(default="default", metadata={"help": "default (ONNX gender + FairFace CNN race), fairface-cnn, "
                                                           "onnx-gender, deepface"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "constructor arguments (e.g. "
                                                                           "weights_home for deepface)"})
    confidence_threshold: float = field(default=0.8, metadata={"help": "predictions below it count as low "
                                                                       "confidence (the sail-sg convention)"})
    race_scoring: Literal["requested", "all"] = field(
        default="requested", metadata={"help": "requested: race = the most probable of groups.races (probabilities "
                                               "renormalised); all: the classifier's top label, 'other' included"})


@dataclass
class MethodConfig:
    """One debiasing method: an objective on the groups, or DPO-style on pairs cut from the same groups."""

    name: str = field(default="mdpo", metadata={"help": "label in the report"})
    objective: str = field(default="mdpo", metadata={"help": "any mmalign objective"})
    beta: Optional[float] = field(default=None, metadata={"help": "β on ρ = −(e_θ − e_ref); give it or beta_d "
                                                                  "(sft needs neither)"})
    beta_d: Optional[float] = field(default=None, metadata={"help": "Diffusion-DPO β_d (β = β_d/2)"})
    params: dict[str, Any] = field(default_factory=dict, metadata={"help": "the objective's other hyperparameters, "
                                                                           "written directly in the method (eps: 0.1)"})
    pairs: bool = field(default=False, metadata={"help": "cut every group into pairs (chosen i, rejected i)"})
    pairs_per_group: Optional[int] = field(
        default=None,
        metadata={"help": "with pairs: pairs taken from each group (draw seeded by groups.seed + training.seed); "
                  "a step takes batch_size "
                  "× this many pairs. null = all k (a step sees the same images as a group step); 1 = the thesis' "
                  "single-sample DPO (one pair per prompt)"},
    )

    FLAT_FIELD: ClassVar[str] = "params"  # other keys of a method are its objective's hyperparameters

    def __post_init__(self) -> None:
        if self.beta is not None and self.beta_d is not None:
            raise ValueError(f"method {self.name!r}: set one of beta and beta_d, not both")
        # build the objective once now, so a wrong name, hyperparameter or missing β fails before any sampling
        from mmalign.shared.objectives import objective

        beta = self.beta if self.beta_d is None else self.beta_d / 2.0
        try:
            objective(self.objective, **({} if beta is None else {"beta": beta}), **self.params)
        except (TypeError, ValueError) as error:
            raise ValueError(f"method {self.name!r}: {error}") from None
        if self.pairs_per_group is not None and (not self.pairs or self.pairs_per_group < 1):
            raise ValueError(f"method {self.name!r}: pairs_per_group must be an integer >= 1 and needs pairs: true; "
                             f"got {self.pairs_per_group!r}")


    def beta_setting(self) -> dict[str, float]:
        """The image trainer's β entry: ``beta`` or ``beta_d`` as configured; with neither, the objective's own
        default β (``sft``, where it only scales the logged rewards)."""
        if self.beta is not None:
            return {"beta": self.beta}
        if self.beta_d is not None:
            return {"beta_d": self.beta_d}
        from mmalign.shared.objectives import objective

        return {"beta": objective(self.objective, **self.params).beta}


def default_methods() -> list[MethodConfig]:
    # The embedded default's settings (the 32×32 pixel-space face model; errors are per-pixel means, like SD's
    # per-latent means, so SD's usual β_d fits); see docs/debias.md for the runs that chose them.
    return [
        MethodConfig(name="mdpo", objective="mdpo", beta_d=5000.0),
        # the thesis' baseline: single-sample DPO, one (chosen, rejected) pair per prompt and step
        MethodConfig(name="dpo", objective="dpo", beta_d=5000.0, pairs=True, pairs_per_group=1),
        # a stronger one: every pair of every group, so a step sees the same images as a group step
        MethodConfig(name="dpo_all_pairs", objective="dpo", beta_d=5000.0, pairs=True),
        # IPO's target margin 1/(2β) on ρ: β = 150 asks for 0.0033, the size of margins mDPO reaches here
        MethodConfig(name="mipo", objective="mipo", beta=150.0),
    ]


@dataclass
class EvaluationConfig:
    """Held-out measurement, before and after."""

    images_per_occupation: int = field(default=24, metadata={"help": "plain-prompt images per held-out occupation"})
    seed: int = field(default=100000, metadata={"help": "first sampling seed (the same seeds for every method)"})
    grid_images: int = field(default=8, metadata={"help": "images per occupation in the PNG grids"})
    quality_images: int = field(default=256, metadata={"help": "real FairFace val faces for the denoising-loss "
                                                               "drift (0 = skip)"})
    quality_noise_draws: int = field(default=4, metadata={"help": "(t, ε) draws per face for that loss"})

    def __post_init__(self) -> None:
        if self.images_per_occupation < 2:
            raise ValueError("evaluation.images_per_occupation must be >= 2")


@dataclass
class DebiasConfig:
    """Demographic debiasing of a text-to-image model with multi-sample preference optimisation (thesis §3.6.2)."""

    output_dir: str = field(default="runs/debias", metadata={"help": "report.json, report.md, PNGs, trained models"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "generated-image cache; null = "
                                                                     "$MMALIGN_CACHE/debias or ~/.cache/mmalign/debias"})
    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_TOP_KEYS

    model: DebiasModelConfig = field(default_factory=DebiasModelConfig, metadata={"help": "the model"})
    lora: LoraConfig = field(
        default_factory=lambda: LoraConfig(enabled=False, r=8, alpha=None, dropout=0.0,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        metadata={"help": "LoRA on the UNet (reference = adapters off); enabled: false = full fine-tuning with a "
                          "frozen reference copy"})
    occupations: OccupationsConfig = field(default_factory=OccupationsConfig, metadata={"help": "occupations"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "image sampling"})
    groups: GroupsConfig = field(default_factory=GroupsConfig, metadata={"help": "preference groups"})
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig, metadata={"help": "demographic classifier"})
    methods: list[MethodConfig] = field(default_factory=default_methods, metadata={"help": "methods to compare"})
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(batch_size=4, learning_rate=1e-5, max_steps=40, lr_scheduler="constant",
                                               logging_steps=5, seed=0),
        metadata={"help": "optimisation of every method (batch_size = groups per step)"})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "evaluation"})

    def __post_init__(self) -> None:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: names must be unique; got {names}")
        if "base" in names:
            raise ValueError("methods: 'base' is reserved for the model before training")
