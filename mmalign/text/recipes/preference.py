"""Preference optimisation of causal LMs: ``mmalign.text.train(config)`` (CLI: ``python -m mmalign.text.train``).

One step = one forward of the policy over every chosen and rejected member of the batch (concatenated; by default
each prompt is encoded once for all its responses, ``training.share_prompt``), one no-grad forward of the
reference (none when its log-probs were precomputed), then any objective of
``mmalign.objective`` (SPEC §1–§5) on the per-sequence response log-likelihoods, shaped ``[B, k]`` with masks
for ragged groups. Objectives with extra inputs receive them by name from numeric data columns
(``batch["extra"]``) or from an ``extra_inputs_hook(model, batch) -> dict`` passed to :func:`train`.

    python -m mmalign.text.train --config configs/text/dpo-tiny.yaml --set training.learning_rate=1e-5
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from mmalign.shared.objectives.registry import objective as build_objective
from mmalign.config import load_config, to_dict
from mmalign.engine import StepOutput, Trainer
from mmalign.engine.optim import fused_adamw_blocker
from mmalign.engine.threads import torch_threads
from mmalign.io import atomic_write_text
from mmalign.text.data.bins import BinAssignment, assign_example_bins, check_bin_column
from mmalign.text.config import TextTrainConfig
from mmalign.text.data.redraw import maybe_redraw
from mmalign.text.evaluation.calibration import CalibrationAccumulator
from mmalign.text.data import PreferenceCollator, TokenizedPreferenceDataset, batch_to_device, load_preference_dataset
from mmalign.text.modeling.fast_paths import fast_path_report
from mmalign.text.modeling.logprobs import batch_logprobs, gather_groups, shared_prompt_slower_on
from mmalign.engine.evaluation import ShardedEvaluation
from mmalign.engine.preference import preference_step
from mmalign.engine.result import TrainResult
from mmalign.shared.compatibility import DataFacts, check_objective_fits_data
from mmalign.shared.records import LogLikelihoods
from mmalign.text.modeling.loading import apply_lora_config, load_causal_lm
from mmalign.text.recipes.inputs import (
    JobInputs,
    check_job_sources,
    describe_model,
    is_peft_model,
    prepare_model_object,
    require,
    resolve_tokenizer,
    split_objects,
)
from mmalign.text.modeling.references import AdapterReference, FrozenModelReference, model_fingerprint, precompute_reference_logps, reference_cache_name

__all__ = ["PreferenceLoss", "PolicyReference", "train", "ExtraInputsHook"]

logger = logging.getLogger("mmalign.text.recipes.preference")

ExtraInputsHook = Callable[[torch.nn.Module, Mapping[str, Any]], Mapping[str, torch.Tensor]]


class PolicyReference:
    """The policy itself under ``no_grad``: the reference when precomputing before any update."""

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            logps, _ = batch_logprobs(model, batch)
        return logps


class PreferenceLoss:
    """``compute_loss`` for the engine: log-likelihoods -> objective -> :class:`StepOutput`.

    ``reference(model, batch) -> [N]`` gives the reference log-likelihoods of the batch's sequences; it is not
    called when the batch carries precomputed ``ref_chosen``/``ref_rejected``.
    """

    def __init__(self, objective, reference: Optional[Callable] = None, extra_inputs_hook: Optional[ExtraInputsHook] = None):
        self.objective = objective
        self.reference = reference
        self.extra_inputs_hook = extra_inputs_hook
        self._input_names = set(getattr(objective, "extra_inputs", ())) | set(getattr(objective, "optional_inputs", ()))

    def log_likelihoods(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> LogLikelihoods:
        """The record the objective consumes: policy and reference response log-likelihoods as [B, k] tensors
        (missing group members hold 0), the masks of ragged groups, the lengths and extra inputs it needs."""
        if "ref_chosen" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
        else:
            if self.reference is None:
                raise ValueError("no reference: pass a reference callable or precompute reference log-probs")
            ref = self.reference(model, batch)
            ref_chosen = gather_groups(ref, batch["chosen_index"])
            ref_rejected = gather_groups(ref, batch["rejected_index"])
        policy, _ = batch_logprobs(model, batch)
        ragged = bool(batch.get("ragged"))
        extra = {k: v for k, v in batch.get("extra", {}).items() if k in self._input_names}
        if self.extra_inputs_hook is not None:
            extra.update(self.extra_inputs_hook(model, batch))
        return LogLikelihoods(
            policy_chosen=gather_groups(policy, batch["chosen_index"]),
            policy_rejected=gather_groups(policy, batch["rejected_index"]),
            ref_chosen=ref_chosen,
            ref_rejected=ref_rejected,
            chosen_mask=batch["chosen_mask"] if ragged else None,
            rejected_mask=batch["rejected_mask"] if ragged else None,
            # per-token NLL (the nll term, sft)
            chosen_lengths=batch["chosen_lengths"] if self.objective.uses_chosen_lengths else None,
            extra=extra,
        )

    def objective_output(self, model: torch.nn.Module, batch: Mapping[str, Any],
                         record: Optional[LogLikelihoods] = None):
        record = record if record is not None else self.log_likelihoods(model, batch)
        return self.objective(**record.objective_inputs())

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> StepOutput:
        return preference_step(self.objective, self.log_likelihoods(model, batch), num_tokens=batch.get("num_tokens"))


class _PreferenceEvalPass:
    """One held-out evaluation (the engine's sharded loop): the objective's loss and metrics per batch, and the
    calibration (ECE) of the implicit reward over the whole set."""

    def __init__(self, loss: PreferenceLoss):
        self.loss = loss
        self.calibration = CalibrationAccumulator()

    def batch(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        record = self.loss.log_likelihoods(model, batch)
        self.calibration.add(record.objective_inputs(), batch)
        out = self.loss.objective_output(model, batch, record)
        return {"loss": out.loss.detach(), **out.metric_tensors}

    def result(self, reduced: dict[str, float], accelerator) -> dict[str, float]:
        return {**reduced, "ece": self.calibration.compute(accelerator)}


def _evaluator(trainer: Trainer, loss: PreferenceLoss, dataset: TokenizedPreferenceDataset, collator, batch_size: int):
    return ShardedEvaluation(trainer, dataset, collator, batch_size, lambda: _PreferenceEvalPass(loss))


def _check_objective_fits_data(objective, cfg: TextTrainConfig, dataset: TokenizedPreferenceDataset,
                               hook: Optional[ExtraInputsHook], source: str) -> None:
    # a column counts only if every row has it: the collator passes on names common to the whole batch
    available = set.intersection(*(set(item.get("extra", {})) for item in dataset.items)) if dataset.items else set()
    # an extra_inputs_hook may supply any input
    supplied = available | (set(objective.extra_inputs) if hook is not None else set())
    check_objective_fits_data(objective, DataFacts(
        source=source, group_sizes=dataset.max_group_sizes, inputs=frozenset(supplied),
        hints={"*": "give them as numeric data columns of the same name, or pass extra_inputs_hook=... to "
                    "mmalign.text.recipes.preference.train",
               "bins": "for causal_dpo's bins add a bins: section (source: length, column or keywords) or write the "
                       "columns with python -m mmalign.text.bins"}))
    if "bins" in getattr(objective, "extra_inputs", ()) and cfg.bins is None and "bins" in available:
        # a precomputed column: refuse what a bins: section refuses (NaN or fractional ids, tiny bins, one bin)
        check_bin_column([item["extra"]["bins"] for item in dataset.items], [item["row"] for item in dataset.items],
                         source=source)


def _bin_examples(cfg: TextTrainConfig, tokenizer, source: str, fitted: Optional[BinAssignment], found: dict):
    """A ``transform_examples`` hook for :func:`load_preference_dataset` that attaches ``cfg.bins``'s bins
    (:func:`mmalign.text.data.bins.assign_example_bins`) and leaves the assignment in ``found["assignment"]``.
    ``fitted``: the training split's assignment, whose length edges / column labels the eval split reuses."""

    def transform(parsed, rows):
        examples, assignment = assign_example_bins(
            parsed, rows, cfg.bins, tokenizer=tokenizer, source=source,
            length_edges=fitted.length_edges if fitted is not None else None,
            column_labels=fitted.labels if fitted is not None and cfg.bins.source == "column" else None,
            check_sizes=fitted is None,  # an eval split may be too small for every bin; its bins mean the train ones
        )
        dropped = [parsed[i].row for i in assignment.dropped_rows]  # unmatched keyword rows
        if dropped:
            logger.warning("%s: %d row(s) without a keyword of every attribute left out (bins.unmatched: drop)",
                           source, len(dropped))
        found["assignment"] = assignment
        found["summary"] = {"labels": assignment.labels, "length_edges": assignment.length_edges,
                            "responses_per_bin": assignment.counts(), "dropped_rows": dropped}
        return examples

    return transform


def _resolve_share_prompt(setting: str, model: torch.nn.Module, dataset: TokenizedPreferenceDataset,
                          collator: PreferenceCollator, device: torch.device, check_examples: int = 4) -> bool:
    """Whether to use the shared-prompt layout. ``on``/``auto`` first score a few examples in both layouts (no
    grad, eval mode): an attention kernel that takes no 4D mask (flash attention) fails, a model whose attention
    or positions ignore the mask / position ids (ALiBi, custom masking) gives different log-probs — ``auto`` then
    falls back to the padded layout, ``on`` stops."""
    if setting == "off":
        return False
    slower = shared_prompt_slower_on(device) if setting == "auto" else None
    if slower is not None:
        logger.info("share_prompt: off (auto): %s", slower)
        return False
    items = [dataset[i] for i in range(min(check_examples, len(dataset)))]
    model.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded, _ = batch_logprobs(model, batch_to_device(replace(collator, share_prompt=False)(items), device))
            try:
                shared, _ = batch_logprobs(model, batch_to_device(replace(collator, share_prompt=True)(items), device))
            except Exception as err:  # an attention kernel without 4D masks; ALiBi models rebuilding a 2D mask
                shared, failure = None, f"{type(err).__name__}: {err}"
    finally:
        model.train(was_training)
    if shared is not None:
        low_precision = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        tolerance = (2e-2 if low_precision else 1e-4) * (1.0 + padded.abs())
        gap = float((shared - padded).abs().max())
        if bool(((shared - padded).abs() <= tolerance).all()):
            logger.info("share_prompt: on (prompt encoded once per example; check on %d examples: max |Δ log p| = "
                        "%.2g)", len(items), gap)
            return True
        failure = f"max |Δ log p| = {gap:.3g} against the padded layout on the first {len(items)} examples"
    message = (f"the shared-prompt layout does not work for this model ({failure}): its attention or positions do "
               "not follow the 4D mask and position ids")
    if setting == "on":
        raise ValueError(f"training.share_prompt: on: {message}")
    logger.warning("share_prompt: off; %s", message)
    return False


def _load_datasets(cfg: TextTrainConfig, tokenizer, inputs: Optional[JobInputs] = None):
    """(train, eval or None, bins summary or None): the bins summary when ``cfg.bins`` computed the bins."""
    common = dict(
        fmt=cfg.data.format,
        subset=cfg.data.subset,
        max_prompt_length=cfg.training.max_prompt_length,
        max_response_length=cfg.training.max_response_length,
        max_length=cfg.training.max_length,
        use_chat_template=cfg.data.use_chat_template,
        system_prompt=cfg.data.system_prompt,
        on_invalid=cfg.data.on_invalid,
    )
    train_bins: dict = {}
    inputs = inputs or JobInputs()
    train_source = inputs.train_dataset if inputs.train_dataset is not None else cfg.data.train
    train_name = "train_dataset" if inputs.train_dataset is not None else None
    transform = _bin_examples(cfg, tokenizer, train_name or cfg.data.train, None, train_bins) if cfg.bins is not None else None
    train_ds = load_preference_dataset(train_source, tokenizer, split=cfg.data.train_split, name=train_name,
                                       max_samples=cfg.data.max_train_samples, transform_examples=transform, **common)
    train_ds = maybe_redraw(train_ds, cfg.data.redraw_members, cfg.training.seed)
    bins = {"spec": to_dict(cfg.bins), "train": train_bins["summary"]} if cfg.bins is not None else None
    eval_ds = None
    eval_source = inputs.eval_dataset if inputs.eval_dataset is not None else cfg.data.eval
    if eval_source is not None:
        eval_name = "eval_dataset" if inputs.eval_dataset is not None else None
        eval_bins: dict = {}
        transform = (_bin_examples(cfg, tokenizer, eval_name or cfg.data.eval, train_bins["assignment"], eval_bins)
                     if cfg.bins is not None else None)
        eval_ds = load_preference_dataset(eval_source, tokenizer, split=cfg.data.eval_split, name=eval_name,
                                          max_samples=cfg.data.max_eval_samples, transform_examples=transform, **common)
        if bins is not None:
            bins["eval"] = eval_bins["summary"]
    return train_ds, eval_ds, bins


def train(
    config: TextTrainConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    overrides: Optional[list[str]] = None,
    resume_from_checkpoint: Any = None,
    extra_inputs_hook: Optional[ExtraInputsHook] = None,
) -> TrainResult:
    """Runs a preference-optimisation run and returns its :class:`~mmalign.engine.TrainResult`.

    ``config``: a :class:`TextTrainConfig`, a dict or a YAML path (None: every default); ``overrides``: dotted
    ``key=value`` strings. ``model``: a ``PreTrainedModel`` or ``PeftModel`` instead of ``model.name_or_path``;
    ``tokenizer``: a tokenizer object; ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset``,
    ``DatasetDict``, ``save_to_disk`` folder or list of dicts instead of ``data.train`` / ``data.eval``, each row
    validated as a file's rows are. ``resume_from_checkpoint`` overrides ``training.resume_from_checkpoint``.
    All data is loaded and validated before any model is loaded.
    """
    config, inputs = split_objects(config, JobInputs(model, tokenizer, train_dataset, eval_dataset))
    cfg = load_config(TextTrainConfig, config, overrides or [])
    require(cfg.model.name_or_path if inputs.model is None else inputs.model, "model.name_or_path", "model")
    require(cfg.data.train if inputs.train_dataset is None else inputs.train_dataset, "data.train", "train_dataset")
    if resume_from_checkpoint is not None:
        cfg.training.resume_from_checkpoint = resume_from_checkpoint
    with torch_threads(cfg.training.num_threads):
        return _train(cfg, inputs, extra_inputs_hook)


def _train(cfg: TextTrainConfig, inputs: JobInputs, extra_inputs_hook: Optional[ExtraInputsHook]) -> TrainResult:
    from accelerate.utils import set_seed

    set_seed(cfg.training.seed)
    check_job_sources(cfg, inputs, ("reference.name_or_path", cfg.reference.name_or_path, "model"))
    objective = build_objective(cfg.objective.name, **cfg.objective.hyperparameters)
    tokenizer = resolve_tokenizer(inputs.tokenizer, cfg.model, inputs.model)
    train_ds, eval_ds, bins = _load_datasets(cfg, tokenizer, inputs)
    _check_objective_fits_data(objective, cfg, train_ds, extra_inputs_hook, cfg.data.train or "train_dataset")
    logger.info("data: %d training examples (%s)%s", len(train_ds), train_ds.data_format,
                f", {len(eval_ds)} eval" if eval_ds is not None else "")
    if bins is not None:
        logger.info("bins (%s): responses per bin %s", cfg.bins.source, bins["train"]["responses_per_bin"])

    load_kwargs = dict(dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code, fused_activations=cfg.model.fused_activations)
    if inputs.model is not None:
        model = prepare_model_object(inputs.model, cfg.model)
    else:
        model = load_causal_lm(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, **load_kwargs)
    already_lora = is_peft_model(model)
    mode = cfg.resolved_reference_mode if not already_lora or cfg.reference.mode != "auto" else "adapter"
    reference_model = None
    if cfg.reference.name_or_path:
        reference_model = load_causal_lm(cfg.reference.name_or_path, gguf_file=cfg.reference.gguf_file, **load_kwargs)
    elif mode == "model":
        reference_model = copy.deepcopy(model)  # the initial policy, frozen
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled and not already_lora:  # a PeftModel object keeps its own adapters
        model = apply_lora_config(model, cfg.lora, gradient_checkpointing=cfg.model.gradient_checkpointing)
    lora = cfg.lora.enabled or already_lora

    # share_prompt is decided once the model sits on its device (see _resolve_share_prompt below)
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    output_dir = Path(cfg.output_dir)
    loss = PreferenceLoss(objective, None, extra_inputs_hook)

    def save_model(unwrapped: torch.nn.Module, directory: Path) -> None:
        unwrapped.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    trainer = Trainer(
        model,
        config=cfg.training,
        output_dir=output_dir,
        train_dataset=train_ds,
        collate_fn=collator,
        compute_loss=loss,
        save_model=save_model,
        resolved_config=cfg,
    )

    collator.share_prompt = _resolve_share_prompt(cfg.training.share_prompt, model, train_ds, collator, trainer.device)
    fast_paths = fast_path_report(
        model, direct_forward=cfg.lora.direct_forward if cfg.lora.enabled else None,
        fused_activations=cfg.model.fused_activations,
        # auto turned off by the device (shared_prompt_slower_on) is a choice, not a fast path that failed its check
        share_prompt_setting="off" if cfg.training.share_prompt == "auto" and shared_prompt_slower_on(trainer.device)
        else cfg.training.share_prompt,
        share_prompt=collator.share_prompt, adamw_blocker=fused_adamw_blocker([p for p in model.parameters() if p.requires_grad]))
    logger.info("fast paths: %s", fast_paths.summary())
    if mode == "adapter":
        loss.reference = AdapterReference(model)
    elif mode == "model":
        loss.reference = FrozenModelReference(trainer.prepare_frozen(reference_model))
    else:  # precomputed: one pass now, cached on disk; the step then runs no reference forward
        if reference_model is not None:
            ref_fn, ref_holder = FrozenModelReference(trainer.prepare_frozen(reference_model)), reference_model
        elif lora:
            ref_fn, ref_holder = AdapterReference(model), model
        else:
            ref_fn, ref_holder = PolicyReference(), model
        model.to(trainer.device)
        adapter_disabled = ref_holder is model and lora
        digest = model_fingerprint(ref_holder, identity=cfg.reference.name_or_path or describe_model(model, cfg.model),
                                   skip_adapters=adapter_disabled)
        cache_dir = Path(cfg.reference.cache_dir) if cfg.reference.cache_dir else output_dir / "reference_cache"
        settings = {"dtype": cfg.model.dtype, "adapter_disabled": adapter_disabled}
        for dataset in (d for d in (train_ds, eval_ds) if d is not None):
            cache = cache_dir / reference_cache_name(dataset.fingerprint(), digest, settings)
            with trainer.accelerator.main_process_first():
                info = precompute_reference_logps(
                    ref_fn, model, getattr(dataset, "pools", dataset), collator,  # every pool member
                    batch_size=cfg.reference.batch_size or cfg.training.batch_size, device=trainer.device,
                    cache_path=cache, show_progress=trainer.is_main_process and cfg.training.progress_bar,
                )
            logger.info("reference log-probs for %s: %s", dataset.source, "cache hit" if info["cache_hit"] else "computed")
        # drop every handle on a separate reference model: training must not hold a second copy
        del ref_fn, ref_holder
        reference_model = None
        loss.reference = None
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()

    if bins is not None and trainer.is_main_process:
        atomic_write_text(output_dir / "bins.json", json.dumps(bins, indent=1))
    if eval_ds is not None:
        trainer.evaluate_fn = _evaluator(trainer, loss, eval_ds, collator, cfg.training.batch_size)
    summary = trainer.train(resume_from_checkpoint=cfg.training.resume_from_checkpoint)
    details = {"reference_mode": mode, "num_train_examples": len(train_ds), "share_prompt": collator.share_prompt,
               "fast_paths": fast_paths.as_dict()}
    if bins is not None:
        details["bins"] = bins
    return TrainResult.from_summary(summary, model=trainer.model, output_dir=output_dir, tokenizer=tokenizer, **details)
