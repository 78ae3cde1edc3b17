"""Step-level variants for bench/ab_step.py: ``variant(name, new)`` is a context manager that switches one
candidate change on (new) or leaves the library as it is (old). Candidates that were kept live in the library;
this module then toggles the library's own switch."""
from __future__ import annotations

import contextlib
import importlib
import os


import mmalign.text.modeling.logprobs as logprobs

_ORIGINAL_MASK = logprobs.shared_prompt_attention_mask


def _float_mask(segment_ids, implementation, dtype):
    # the additive float mask eager gets, handed to sdpa as well
    return _ORIGINAL_MASK(segment_ids, "eager" if implementation == "sdpa" else implementation, dtype)


# kept changes with module-level switches in the library: change -> ((module, switch), ...)
_LIBRARY_SWITCHES = {
    "lora_function": (("mmalign.engine.lora_forward", "USE_LORA_FUNCTION"),),
    "head_rows": (("mmalign.text.modeling.logprobs", "HOOK_ON_ALL_POSITIONS"),),
    "sigmoid_gelu": (("mmalign.text.modeling.tanh_gelu", "SIGMOID_FORM"),),
    "fused_norm_rope": (("mmalign.text.modeling.rms_norm", "USE_FUSED_FORWARD"),
                        ("mmalign.text.modeling.rotary", "USE_FUSED_ROTARY")),
    "last_layer": (("mmalign.text.modeling.scored_last_layer", "USE_SCORED_LAST_LAYER"),),
}


@contextlib.contextmanager
def variant(name: str, new: bool, models=()):
    if name in _LIBRARY_SWITCHES:  # both sides set: the library's switch on (new) or off (old)
        switches = [(importlib.import_module(m), a) for m, a in _LIBRARY_SWITCHES[name]]
        saved = [getattr(module, attribute) for module, attribute in switches]
        for module, attribute in switches:
            setattr(module, attribute, new)
        try:
            yield
        finally:
            for (module, attribute), value in zip(switches, saved):
                setattr(module, attribute, value)
        return
    if not new or name == "none":
        yield
        return
    if name == "keep_norms":  # RMSNorm outputs kept for backward instead of recomputed (the library's default)
        saved = logprobs.recompute_norm_outputs
        logprobs.recompute_norm_outputs = lambda model: contextlib.nullcontext()
        try:
            yield
        finally:
            logprobs.recompute_norm_outputs = saved
        return
    if name == "silu_mul":  # the lean SiLU-gated MLP forward on every gated MLP
        from mmalign.text.modeling.gated_mlp import GATED_MLP_CLASSES, use_lean_gated_mlps

        for m in models:
            if m is not None:
                use_lean_gated_mlps(m)
        try:
            yield
        finally:
            for m in models:
                for module in (m.modules() if m is not None else ()):
                    if type(module).__name__ in GATED_MLP_CLASSES:
                        module.__dict__.pop("forward", None)
        return
    if name in ("mmap", "trim"):  # glibc: big blocks mmapped (returned on free) / heap trimmed after the step
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if name == "mmap":
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        try:
            yield
        finally:
            if name == "mmap":
                libc.mallopt(-3, 32 * 2**20)  # about where glibc's dynamic threshold ends on this step
            else:
                libc.malloc_trim(0)
        return
    if name == "eager":  # transformers' eager attention (matmul, mask add, softmax, matmul) instead of sdpa
        configs = [m.config for m in models if m is not None]
        before = [c._attn_implementation for c in configs]
        for c in configs:
            c._attn_implementation = "eager"
        try:
            yield
        finally:
            for c, b in zip(configs, before):
                c._attn_implementation = b
        return
    if name == "float_mask":
        logprobs.shared_prompt_attention_mask = _float_mask
        try:
            yield
        finally:
            logprobs.shared_prompt_attention_mask = _ORIGINAL_MASK
    elif name == "gqa":
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
        try:
            yield
        finally:
            os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
    else:
        raise ValueError(name)
