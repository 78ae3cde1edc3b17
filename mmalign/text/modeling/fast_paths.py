"""Which of the text trainer's fast paths a run takes, and why not when one is not taken.

The fast paths (``lora.direct_forward``, ``training.share_prompt``, ``model.fused_activations``, fused AdamW, and
the LM head run only at scored positions through transformers' ``logits_to_keep``) each fall back to the plain
code when their conditions do not hold, so a dependency change (a renamed transformers activation class, a new
peft layer attribute, a parameter dtype) could disable one without an error; only a benchmark would notice, weeks
later. Instead: every fallback logs a warning once (naming the fast path and the reason),
:func:`fast_path_report` says at start what the run uses, and tests assert that the tiny GPT-2 and the SmolLM2
(Llama) layouts take all of them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from mmalign.text.modeling.fallbacks import warn_not_taken
from mmalign.text.modeling.fast_layers import is_direct_lora_forward, is_python_tanh_gelu
from mmalign.text.modeling.gated_mlp import GATED_MLP_CLASSES, is_lean_gated_mlp
from mmalign.text.modeling.loading import unwrap
from mmalign.text.modeling.logprobs import accepts_logits_to_keep
from mmalign.text.modeling.rms_norm import RMS_NORM_CLASSES, is_fused_rms_norm
from mmalign.text.modeling.rotary import is_fused_rotary, rotary_modules
from mmalign.text.modeling.scored_head import has_output_layer

__all__ = ["FastPathReport", "fast_path_report"]

# transformers' activation names that are a Python tanh-GELU (what fuse_activations replaces)
_PYTHON_TANH_GELU_NAMES = ("gelu_new", "gelu_fast", "gelu_python_tanh")


@dataclass
class FastPathReport:
    """What a run uses. ``not_taken``: fast path -> why, for each one enabled in the config but not in use."""

    layout: str  # model type and attention implementation, e.g. "gpt2, sdpa attention"
    lora_layers: int = 0  # peft LoRA layers in the model
    lora_direct_layers: int = 0  # of which run the direct forward
    fused_gelus: int = 0  # torch GELU(approximate="tanh") modules
    python_gelus: int = 0  # Python tanh-GELU modules left
    lean_gated_mlps: int = 0  # SiLU-gated MLPs keeping one activation fewer (model.fused_activations)
    plain_gated_mlps: int = 0  # transformers' gated MLPs left with their own forward
    fused_rms_norms: int = 0  # Llama-family RMSNorms running as one autograd function (model.fused_activations)
    plain_rms_norms: int = 0  # Llama-family RMSNorms left with transformers' forward
    fused_rotary: bool = False  # RoPE of the scoring forwards as one autograd function (model.fused_activations)
    share_prompt: bool = False
    fused_adamw: bool = False
    logits_to_keep: bool = False  # the LM head runs only where a response token is scored (row hook or logits_to_keep)
    not_taken: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lora = f"{self.lora_direct_layers}/{self.lora_layers} LoRA layers direct" if self.lora_layers else "no LoRA"
        gelu = f"{self.fused_gelus} fused GELU" + (f", {self.python_gelus} Python GELU left" if self.python_gelus else "")
        if self.lean_gated_mlps or self.plain_gated_mlps:
            gelu += f"; {self.lean_gated_mlps}/{self.lean_gated_mlps + self.plain_gated_mlps} lean gated MLPs"
        if self.fused_rms_norms or self.plain_rms_norms:
            gelu += (f"; {self.fused_rms_norms}/{self.fused_rms_norms + self.plain_rms_norms} fused RMSNorms; "
                     f"fused RoPE {'on' if self.fused_rotary else 'off'}")
        return (f"{self.layout}; {lora}; {gelu}; share_prompt {'on' if self.share_prompt else 'off'}; "
                f"fused AdamW {'on' if self.fused_adamw else 'off'}; logits_to_keep {'on' if self.logits_to_keep else 'off'}")


def hidden_act_is_silu(activation) -> bool:
    return activation in ("silu", "swish")


def fast_path_report(model: torch.nn.Module, *, direct_forward: Optional[bool], fused_activations: bool,
                     share_prompt_setting: str, share_prompt: bool, adamw_blocker: Optional[str]) -> FastPathReport:
    """Inspects ``model`` (after LoRA and activation fusing) and the decisions taken. ``direct_forward``: the
    ``lora.direct_forward`` setting, None without LoRA; ``adamw_blocker``: why fused AdamW cannot be used, or None
    (:func:`mmalign.engine.optim.fused_adamw_blocker`). Logs a warning for every enabled fast path not taken."""

    config = getattr(model, "config", None)
    layout = (f"{getattr(config, 'model_type', type(model).__name__)}, "
              f"{getattr(config, '_attn_implementation', None) or 'default'} attention")
    report = FastPathReport(layout=layout, share_prompt=share_prompt, fused_adamw=adamw_blocker is None,
                            logits_to_keep=accepts_logits_to_keep(model) or has_output_layer(unwrap(model)),
                            fused_rotary=is_fused_rotary(unwrap(model)))
    slow_bases = Counter()
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            report.lora_layers += 1
            if is_direct_lora_forward(module):
                report.lora_direct_layers += 1
            else:
                slow_bases[f"{type(module).__name__} over {type(module.base_layer).__name__}"] += 1
        elif isinstance(module, torch.nn.GELU) and module.approximate == "tanh":
            report.fused_gelus += 1
        elif is_python_tanh_gelu(module):
            report.python_gelus += 1
        elif is_lean_gated_mlp(module):
            report.lean_gated_mlps += 1
        elif type(module).__name__ in GATED_MLP_CLASSES:
            report.plain_gated_mlps += 1
        elif is_fused_rms_norm(module):
            report.fused_rms_norms += 1
        elif type(module).__name__ in RMS_NORM_CLASSES:
            report.plain_rms_norms += 1
    if direct_forward and slow_bases:
        report.not_taken["lora.direct_forward"] = (
            f"{sum(slow_bases.values())} of {report.lora_layers} LoRA layers keep peft's forward "
            f"({', '.join(f'{n}× {k}' for k, n in slow_bases.items())}: only peft's plain lora.Linear over "
            "nn.Linear/Conv1D has the direct forward)")
    activation = getattr(config, "activation_function", None) or getattr(config, "hidden_act", None)
    if fused_activations and (report.python_gelus or (activation in _PYTHON_TANH_GELU_NAMES and not report.fused_gelus)):
        report.not_taken["model.fused_activations"] = (
            f"the model's activation {activation!r} is a Python tanh-GELU but {report.python_gelus} such module(s) "
            f"are left and {report.fused_gelus} fused (transformers' activation classes changed?)")
    if fused_activations and report.plain_gated_mlps and hidden_act_is_silu(activation):
        report.not_taken["model.fused_activations (gated MLP)"] = (
            f"{report.plain_gated_mlps} SiLU-gated MLP(s) keep transformers' forward (hooks on the activation, or its "
            "class changed?): each keeps one activation more for backward")
    if fused_activations and report.plain_rms_norms:
        report.not_taken["model.fused_activations (RMSNorm)"] = (
            f"{report.plain_rms_norms} RMSNorm(s) keep transformers' forward (a forward or hooks of their own, or "
            "their attributes changed?): each runs ~10 more elementwise passes per step")
    if fused_activations and not report.fused_rotary and rotary_modules(unwrap(model)):
        report.not_taken["model.fused_activations (RoPE)"] = (
            "the model has Llama-family attention but its RoPE is transformers' (apply_rotary_pos_emb replaced "
            "or the model not prepared by mmalign's loader)")
    if share_prompt_setting != "off" and not share_prompt:
        report.not_taken["training.share_prompt"] = ("the check against the padded layout failed (see the warning "
                                                      "above); every response is encoded with its own prompt copy")
    if not report.logits_to_keep:
        report.not_taken["logits_to_keep"] = ("the model's forward does not take logits_to_keep and it has no output "
                                              "layer to hook: the LM head runs at every position, prompt tokens "
                                              "included")
    if adamw_blocker is not None:
        report.not_taken["fused AdamW"] = adamw_blocker
    for name, why in report.not_taken.items():
        warn_not_taken(name, why)
    return report
