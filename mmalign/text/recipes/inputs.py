"""What a text job is given besides its config: model and tokenizer objects, in-memory datasets.

``mmalign.text.train(config, model=..., tokenizer=..., train_dataset=..., eval_dataset=...)``: a
``PreTrainedModel`` or ``PeftModel`` (then ``model.name_or_path`` may be omitted), a tokenizer object, and data as
a ``datasets.Dataset``, a ``DatasetDict``, a ``save_to_disk`` folder, or a list of dicts (then ``data.train`` may be
omitted). Objects may also sit in a config mapping where a path would (``{"data": {"train": ds}}``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from mmalign.config import ConfigError
from mmalign.text.modeling.loading import ensure_pad_token, fuse_activations, load_tokenizer

__all__ = ["JobInputs", "is_path", "split_objects", "require", "is_peft_model", "resolve_tokenizer", "prepare_model_object",
           "check_job_sources"]


@dataclass
class JobInputs:
    model: Any = None
    tokenizer: Any = None
    train_dataset: Any = None
    eval_dataset: Any = None


def is_path(value: Any) -> bool:
    """Whether a config value is a path (or unset) rather than an object standing in its place."""
    return value is None or isinstance(value, (str, os.PathLike))


def split_objects(config: Any, given: JobInputs) -> tuple[Any, JobInputs]:
    """``config`` without the objects it holds in place of paths (``model``, ``data.train``, ``data.eval``),
    and the objects: those passed as arguments win over those found in the config."""
    if not isinstance(config, Mapping):
        return config, given
    config = dict(config)
    found = JobInputs()
    model = config.get("model")
    if model is not None and not isinstance(model, Mapping) and not is_path(model):
        found.model = config.pop("model")
    data = config.get("data")
    if isinstance(data, Mapping):
        data = dict(data)
        for key, attr in (("train", "train_dataset"), ("eval", "eval_dataset")):
            if not is_path(data.get(key)):
                setattr(found, attr, data.pop(key))
        config["data"] = data
    merged = JobInputs(*(g if g is not None else f for g, f in zip(
        (given.model, given.tokenizer, given.train_dataset, given.eval_dataset),
        (found.model, found.tokenizer, found.train_dataset, found.eval_dataset))))
    return config, merged


def require(value: Any, key: str, argument: str) -> None:
    if value is None or (isinstance(value, str) and not value):
        raise ConfigError(f"{key}: required; set it in the config or pass {argument}=... to the call")


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def resolve_tokenizer(tokenizer: Any, model_config, model: Any = None):
    """The tokenizer object given, else the one named by ``model.tokenizer`` / ``model.name_or_path``, else the one
    saved with the model object (its ``name_or_path``)."""
    if tokenizer is not None:
        ensure_pad_token(tokenizer, "tokenizer", ConfigError)
        tokenizer.padding_side = "right"
        if model_config.chat_template:
            tokenizer.chat_template = model_config.chat_template
        return tokenizer
    source = model_config.tokenizer or model_config.name_or_path
    if source is None and model is not None:
        source = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        if not source or not os.path.isdir(str(source)):
            raise ConfigError("model.tokenizer: the model object carries no tokenizer folder; pass tokenizer=... "
                              "(a tokenizer object) or set model.tokenizer")
    return load_tokenizer(source, gguf_file=None if model_config.tokenizer else model_config.gguf_file,
                          chat_template=model_config.chat_template, trust_remote_code=model_config.trust_remote_code)


def prepare_model_object(model: Any, model_config) -> torch.nn.Module:
    """A model object as the loader would have left it: a causal LM (``PreTrainedModel`` or ``PeftModel``) in
    training mode, with the fused activations when the config asks for them."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"model: expected a transformers PreTrainedModel or a peft PeftModel, or a path; got "
                          f"{type(model).__name__}")
    if model_config.fused_activations:
        fuse_activations(model)
    return model.train()


def describe_model(model: Any, model_config) -> str:
    """The model's identity in logs and cache keys."""
    if model_config.name_or_path:
        return str(model_config.name_or_path)
    return getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__


def check_job_sources(cfg: Any, inputs: JobInputs, *extra: tuple[str, Any, str]) -> None:
    """Checks the model, tokenizer and data sources the config names and no object replaces (and ``extra``
    ``(key, value, kind)`` ones) before anything loads: offline hub names fail in seconds, naming the key."""
    from mmalign.hub import check_sources

    given = (("model.name_or_path", cfg.model.name_or_path, inputs.model, "model"),
             ("model.tokenizer", cfg.model.tokenizer, inputs.tokenizer, "model"),
             ("data.train", cfg.data.train, inputs.train_dataset, "dataset"),
             ("data.eval", cfg.data.eval, inputs.eval_dataset, "dataset"))
    sources = [(key, value, kind) for key, value, obj, kind in given if obj is None and value]
    check_sources(sources + [(key, value, kind) for key, value, kind in extra if value])
