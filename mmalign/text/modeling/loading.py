"""Loading causal LMs and tokenizers, LoRA, and unwrapping distributed / compiled wrappers.

"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from mmalign.text.modeling.fast_layers import fuse_activations, use_direct_lora_forward

__all__ = [
    "TORCH_DTYPES",
    "load_tokenizer",
    "ensure_pad_token",
    "load_causal_lm",
    "apply_lora",
    "apply_lora_config",
    "fuse_activations",
    "use_direct_lora_forward",
    "unwrap",
    "load_model_for_eval",
]

logger = logging.getLogger("mmalign.text.models")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _expand(name_or_path: str) -> str:
    # "~/models/x" in a YAML file means the home folder; hub names never start with "~".
    return os.path.expanduser(name_or_path) if name_or_path.startswith("~") else name_or_path


def ensure_pad_token(tokenizer: Any, where: str, error: type[Exception] = ValueError) -> None:
    """Gives ``tokenizer`` its EOS token as pad token when it has none (batches are padded); ``error(where: ...)``
    when it has neither."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise error(f"{where}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(name_or_path: str, *, gguf_file: Optional[str] = None, chat_template: Optional[str] = None,
                   trust_remote_code: bool = False):
    """``AutoTokenizer`` with right padding and a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    name_or_path = _expand(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    ensure_pad_token(tokenizer, name_or_path)
    tokenizer.padding_side = "right"
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    *,
    gguf_file: Optional[str] = None,
    dtype: str = "float32",
    attn_implementation: Optional[str] = None,
    trust_remote_code: bool = False,
    fused_activations: bool = True,
):
    """``AutoModelForCausalLM.from_pretrained`` by hub name or local folder (optionally a GGUF file inside it).
    ``fused_activations``: see :func:`fuse_activations`."""
    from transformers import AutoModelForCausalLM

    name_or_path = _expand(name_or_path)
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"model.dtype: invalid value {dtype!r}; expected one of {', '.join(TORCH_DTYPES)}")
    kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise OSError(f"model {name_or_path!r}: cannot load ({err}); give a local folder or a hub name available "
                      "offline") from err
    if fused_activations:
        fuse_activations(model)
    return model


def apply_lora(model, *, r: int = 16, alpha: float = 32.0, dropout: float = 0.05, target_modules: Any = "all-linear",
               initial_adapter: Optional[str] = None, direct_forward: bool = True):
    """Wraps ``model`` in a PEFT LoRA model; only the adapters are trainable. ``initial_adapter``: a saved adapter
    folder to continue from (its own r/alpha/targets apply), instead of a fresh zero-initialised adapter.
    ``direct_forward``: see :func:`use_direct_lora_forward`."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if initial_adapter:
        peft_model = PeftModel.from_pretrained(model, _expand(initial_adapter), is_trainable=True)
    else:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                            task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
    if direct_forward:
        use_direct_lora_forward(peft_model)
    return peft_model


def apply_lora_config(model, lora, *, gradient_checkpointing: bool = False):
    """:func:`apply_lora` with the settings of a ``lora:`` config section (:class:`mmalign.text.config.LoraConfig`);
    under gradient checkpointing the inputs are made to require grad, so the frozen embeddings still pass
    gradients on to the adapters."""
    model = apply_lora(model, r=lora.r, alpha=lora.scale_alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                       initial_adapter=lora.initial_adapter, direct_forward=lora.direct_forward)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strips DDP/DeepSpeed/compile wrappers (``.module`` / ``._orig_mod``), keeping PEFT."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def load_model_for_eval(path: str, *, dtype: str = "float32"):
    """(model, tokenizer) from a model folder/hub name, or from a LoRA adapter folder (base + adapter)."""
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{adapter_config}: no base_model_name_or_path; cannot find the base model")
        model = PeftModel.from_pretrained(load_causal_lm(base_path, dtype=dtype), path)
        tokenizer_source = path if (Path(path) / "tokenizer_config.json").is_file() else base_path
        tokenizer = load_tokenizer(tokenizer_source)
    else:
        model, tokenizer = load_causal_lm(path, dtype=dtype), load_tokenizer(path)
    model.eval()
    return model, tokenizer
