"""Supervised fine-tuning on prompt/response rows with the same engine: ``python -m mmalign.text.sft``.

Builds the SFT / reference models that preference runs start from. Loss: mean negative log-likelihood of the
response tokens (prompt tokens are never scored). Rows: ``{prompt, response}`` or ``{prompt, completion}``
strings; ``{messages: [...]}`` conversations (the last assistant message is the response); or any preference
schema of ``mmalign.text.data`` (the first chosen response is the target).

    python -m mmalign.text.sft --config configs/text/sft-tiny.yaml --set training.max_steps=100
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional

import torch

from mmalign.config import load_config
from mmalign.engine import StepOutput, Trainer
from mmalign.engine.evaluation import ShardedEvaluation
from mmalign.engine.threads import torch_threads
from mmalign.text.config import LoraConfig, ModelConfig, TextTrainingConfig
from mmalign.text.data import (
    PreferenceCollator,
    PreferenceExample,
    PreferenceTokenizer,
    TokenizedPreferenceDataset,
    load_rows,
    parse_preference_rows,
)
from mmalign.text.modeling.logprobs import sequence_logprobs
from mmalign.text.modeling.loading import apply_lora_config, load_causal_lm
from mmalign.text.recipes.inputs import (
    JobInputs, check_job_sources, is_peft_model, prepare_model_object, require, resolve_tokenizer, split_objects,
)
from mmalign.engine.result import TrainResult
from mmalign.engine.sections import OLD_DATA_KEYS, OLD_TOP_KEYS
from mmalign.cli import run_command

__all__ = ["SFTDataConfig", "SFTConfig", "parse_sft_rows", "sft_loss", "train", "main"]

logger = logging.getLogger("mmalign.text.recipes.sft")


@dataclass
class SFTDataConfig:
    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_DATA_KEYS
    train: Optional[str] = field(
        default=None, metadata={"help": "training data: a .json/.jsonl(.gz)/.parquet/.csv file, a dataset folder or a "
                                        "hub dataset name; may be omitted when the call passes train_dataset=..."})
    train_split: str = field(default="train", metadata={"help": "split of a hub dataset"})
    eval: Optional[str] = field(default=None, metadata={"help": "evaluation data (file or hub name); null = none"})
    eval_split: str = field(default="test", metadata={"help": "split of the hub eval dataset"})
    subset: Optional[str] = field(default=None, metadata={"help": "hub dataset configuration name"})
    format: Literal["auto", "prompt_response", "messages", "preference"] = field(
        default="auto",
        metadata={"help": "prompt_response {prompt, response|completion}; messages {messages: [...]}; preference "
                  "(any preference schema, trains on the first chosen response); auto = detect"},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N training rows"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N eval rows"})
    use_chat_template: bool = field(default=False, metadata={"help": "render plain-text prompts with the chat template"})
    system_prompt: Optional[str] = field(default=None, metadata={"help": "system message for chat-templated prompts"})
    on_invalid: Literal["error", "skip"] = field(default="error", metadata={"help": "malformed rows: error or skip"})


@dataclass
class SFTConfig:
    """A supervised fine-tuning run."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_TOP_KEYS

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the model to fine-tune"})
    data: SFTDataConfig = field(default_factory=SFTDataConfig, metadata={"help": "prompt/response data"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "optional LoRA adapters"})
    training: TextTrainingConfig = field(default_factory=TextTrainingConfig, metadata={"help": "optimisation"})
    output_dir: str = field(default="outputs/sft-run", metadata={"help": "run folder (metrics, checkpoints, final/)"})


def _sft_format(row: Mapping[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "prompt" in row and ("response" in row or "completion" in row):
        return "prompt_response"
    return "preference"


def parse_sft_rows(rows, *, fmt: str = "auto", source: str = "<data>", on_invalid: str = "error") -> list[PreferenceExample]:
    """Validated SFT examples as ``PreferenceExample(prompt, [response], [])``; errors name file, row and field."""
    if len(rows) == 0:
        raise ValueError(f"{source}: no rows")
    if fmt == "auto":
        fmt = _sft_format(rows[0])
    if fmt == "preference":
        examples, _ = parse_preference_rows(rows, source=source, on_invalid=on_invalid)
        return [PreferenceExample(e.prompt, e.chosen[:1], [], e.row) for e in examples]
    examples, skipped = [], 0
    for index, row in enumerate(rows):
        number = index + 1
        try:
            if fmt == "messages":
                messages = row.get("messages")
                if not isinstance(messages, (list, tuple)) or not messages or not all(isinstance(m, Mapping) for m in messages):
                    raise ValueError("messages", f"expected a non-empty list of {{role, content}} messages, got {messages!r:.60}")
                messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
                if any(not isinstance(m["role"], str) or not isinstance(m["content"], str) for m in messages):
                    raise ValueError("messages", "every message needs string 'role' and 'content'")
                if messages[-1]["role"] != "assistant" or len(messages) < 2:
                    raise ValueError("messages", "the last message must be the assistant's, after >= 1 prompt message")
                examples.append(PreferenceExample(messages[:-1], [messages[-1:]], [], number))
            else:
                prompt = row.get("prompt")
                key = "response" if row.get("response") is not None else "completion"
                response = row.get(key)
                if not isinstance(prompt, str):
                    raise ValueError("prompt", f"expected a string, got {prompt!r:.60}")
                if not isinstance(response, str) or not response.strip():
                    raise ValueError(key, f"expected a non-empty string, got {response!r:.60}")
                examples.append(PreferenceExample(prompt, [response], [], number))
        except ValueError as err:
            field_name, message = err.args if len(err.args) == 2 else ("?", str(err))
            text = f"{source}: row {number}: field {field_name!r}: {message} (format {fmt})"
            if on_invalid == "skip":
                skipped += 1
                continue
            raise ValueError(text) from None
    if skipped:
        logger.warning("%s: skipped %d malformed row(s)", source, skipped)
    if not examples:
        raise ValueError(f"{source}: every row is malformed")
    return examples


def sft_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> StepOutput:
    """Token-mean NLL of the response tokens of the batch."""
    logps, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                      logits_start=batch.get("logits_start"))
    loss = -logps.sum() / counts.sum().clamp_min(1)
    return StepOutput(loss=loss, metrics={"nll": loss.detach()}, num_tokens=batch.get("num_tokens"))


class _SFTEvalPass:
    """One held-out evaluation (the engine's sharded loop): the per-token NLL of the responses over the whole set."""

    def batch(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        logps, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                          logits_start=batch.get("logits_start"))
        return {"nll_sum": -logps.sum(), "tokens": counts.sum().float()}

    def result(self, reduced: dict[str, float], accelerator) -> dict[str, float]:
        # the ratio in float32, as the sums were taken
        nll = float(torch.tensor(reduced.get("nll_sum", 0.0)) / torch.tensor(reduced.get("tokens", 0.0)).clamp_min(1))
        return {"loss": nll, "nll": nll}


def _dataset(cfg: SFTConfig, tokenizer, source: Any, split: str, max_samples: Optional[int],
             name: Optional[str] = None) -> TokenizedPreferenceDataset:
    rows = load_rows(source, split=split, subset=cfg.data.subset, max_samples=max_samples, name=name)
    source = rows.source
    examples = parse_sft_rows(rows, fmt=cfg.data.format, source=source, on_invalid=cfg.data.on_invalid)
    encoder = PreferenceTokenizer(
        tokenizer, max_prompt_length=cfg.training.max_prompt_length,
        max_response_length=cfg.training.max_response_length, max_length=cfg.training.max_length,
        use_chat_template=cfg.data.use_chat_template, system_prompt=cfg.data.system_prompt,
    )
    try:
        return TokenizedPreferenceDataset(encoder(examples), source=source, data_format="sft")
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def train(config: SFTConfig | Mapping[str, Any] | str | Path | None = None, *, model: Any = None,
          tokenizer: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
          overrides: Optional[list[str]] = None, resume_from_checkpoint: Any = None) -> TrainResult:
    """Runs SFT; returns its :class:`~mmalign.engine.TrainResult`. ``final/`` holds the model (or adapter) +
    tokenizer + config. Objects as in :func:`mmalign.text.train` (a model, a tokenizer, in-memory datasets)."""
    config, inputs = split_objects(config, JobInputs(model, tokenizer, train_dataset, eval_dataset))
    cfg = load_config(SFTConfig, config, overrides or [])
    require(cfg.model.name_or_path if inputs.model is None else inputs.model, "model.name_or_path", "model")
    require(cfg.data.train if inputs.train_dataset is None else inputs.train_dataset, "data.train", "train_dataset")
    if resume_from_checkpoint is not None:
        cfg.training.resume_from_checkpoint = resume_from_checkpoint
    with torch_threads(cfg.training.num_threads):
        return _train(cfg, inputs)


def _train(cfg: SFTConfig, inputs: JobInputs) -> TrainResult:
    from accelerate.utils import set_seed

    set_seed(cfg.training.seed)
    check_job_sources(cfg, inputs)
    tokenizer = resolve_tokenizer(inputs.tokenizer, cfg.model, inputs.model)
    if inputs.train_dataset is not None:
        train_ds = _dataset(cfg, tokenizer, inputs.train_dataset, cfg.data.train_split, cfg.data.max_train_samples,
                            name="train_dataset")
    else:
        train_ds = _dataset(cfg, tokenizer, cfg.data.train, cfg.data.train_split, cfg.data.max_train_samples)
    eval_ds = None
    if inputs.eval_dataset is not None:
        eval_ds = _dataset(cfg, tokenizer, inputs.eval_dataset, cfg.data.eval_split, cfg.data.max_eval_samples,
                           name="eval_dataset")
    elif cfg.data.eval:
        eval_ds = _dataset(cfg, tokenizer, cfg.data.eval, cfg.data.eval_split, cfg.data.max_eval_samples)
    if inputs.model is not None:
        model = prepare_model_object(inputs.model, cfg.model)
    else:
        model = load_causal_lm(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype,
                               attn_implementation=cfg.model.attn_implementation,
                               trust_remote_code=cfg.model.trust_remote_code,
                               fused_activations=cfg.model.fused_activations)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled and not is_peft_model(model):
        model = apply_lora_config(model, cfg.lora, gradient_checkpointing=cfg.model.gradient_checkpointing)
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)

    def save_model(unwrapped: torch.nn.Module, directory: Path) -> None:
        unwrapped.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    trainer = Trainer(model, config=cfg.training, output_dir=cfg.output_dir, train_dataset=train_ds,
                      collate_fn=collator, compute_loss=sft_loss, save_model=save_model, resolved_config=cfg,
                      plot_keys=("loss",))
    if eval_ds is not None:
        trainer.evaluate_fn = ShardedEvaluation(trainer, eval_ds, collator, cfg.training.batch_size, _SFTEvalPass,
                                                reduction="sum")
    summary = trainer.train(resume_from_checkpoint=cfg.training.resume_from_checkpoint)
    return TrainResult.from_summary(summary, model=trainer.model, output_dir=cfg.output_dir, tokenizer=tokenizer)


def _run(cfg: SFTConfig, args) -> int:
    from accelerate import PartialState

    result = train(cfg)
    if PartialState().is_main_process:  # one summary line per job, not per process
        print(result.summary_line())
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(
        prog="python -m mmalign.text.sft", config_cls=SFTConfig, run=_run, argv=argv,
        description="Supervised fine-tuning of a causal LM on prompt/response rows (response-token NLL). Writes "
        "metrics.jsonl, metrics.png, checkpoints/ and final/ (model or LoRA adapter + tokenizer + config).")
