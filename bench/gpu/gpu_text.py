"""Text section: DPO and mDPO (k = 4) steps of a Llama-layout model, LoRA and full fine-tuning, two sequence lengths:
mmalign vs TRL's DPOTrainer (bench_text_dpo.run_trl) vs a bare loop, interleaved (each setting runs the three
implementations back to back), all in one process (no per-case start-up cost), each case's peak memory counted
from a reset after the previous case was freed.

Every sequence holds ``seq_len`` tokens (a quarter prompt, the rest response + EOS) of words that are one token
each, so every implementation sees the same token count; a step holds about ``tokens_per_step`` tokens (DPO:
pairs of 2 sequences, mDPO: groups of 2k). Model FLOPs per step = 6·N·tokens (policy forward + backward) +
2·N·tokens (reference forward), N = all parameters (tied embedding counted once), whatever the fine-tuning mode.
TRL 1.16 has no group objective: its mDPO cells are recorded as not applicable.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from gpu_common import CaseLog, CaseRunner, make_step_timer, median, peak_mib, pick_device, reset_peak

BETA, LR, K = 0.1, 1e-5, 4
IMPLS = ("mmalign", "trl", "bare")
# mmalign with one setting changed (config overrides), for the focused plan: what costs mmalign its step on a GPU.
MMALIGN_VARIANTS = {
    "mmalign": {},  # the library's default for the device (since session 14: prompt not shared on CUDA)
    "mmalign-share": {"training": {"share_prompt": "on"}},
    "mmalign-noshare": {"training": {"share_prompt": "off"}},
    "mmalign-noshare-nofused": {"training": {"share_prompt": "off"}, "model": {"fused_activations": False}},
    # the log-softmax chunk of the H200 run (4 Mi elements: 32 rows of a 128k vocabulary), against today's default
    "mmalign-noshare-smallchunks": {"training": {"share_prompt": "off"}},
}
# module attributes a variant sets for its run (restored after): (module, attribute, value)
MMALIGN_PATCHES = {"mmalign-noshare-smallchunks": [("mmalign.text.modeling.logprobs", "_CHUNK_ELEMENTS_ACCELERATOR", 1 << 22)]}
# Llama-3.2-1B's shape (1.24B parameters with its 128256-token vocabulary); random weights.
LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                    max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=0, tie_word_embeddings=True, max_position_embeddings=256, rms_norm_eps=1e-5)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TextSettings:
    shape: dict
    shape_name: str
    dtype: str  # "bfloat16" | "float32"
    seq_lens: tuple[int, ...]
    tokens_per_step: int
    warmup: int
    steps: int
    rounds: int
    gradient_checkpointing: bool = False
    threads: int | None = None
    case_estimate_s: float = 0.0  # a case is not started with less section time left (until one has been timed)


# 2048 first: the MFU goal is measured there, and a section out of time skips its last cases.
GPU = TextSettings(LLAMA_3_2_1B, "Llama-3.2-1B shape", "bfloat16", (2048, 512), 16384, warmup=2, steps=4, rounds=2,
                   case_estimate_s=12.0)
DRY = TextSettings(TINY, "tiny Llama layout", "float32", (32,), 256, warmup=1, steps=2, rounds=1, threads=1,
                   case_estimate_s=2.0)


def single_token_words(tokenizer, count: int = 24) -> list[str]:
    """Words that encode to exactly one token after a space (so " w1 w2 ..." is exactly one token per word)."""
    words = []
    for token in sorted(tokenizer.get_vocab()):
        word = tokenizer.convert_tokens_to_string([token])
        if word.startswith(" ") and word[1:].isalpha() and len(word) > 2:
            if len(tokenizer(word * 2, add_special_tokens=False)["input_ids"]) == 2:
                words.append(word)
    if len(words) < 6:
        raise RuntimeError(f"the tokenizer has only {len(words)} single-token words; need 6")
    return words[:count]


def make_rows(tokenizer, seq_len: int, examples: int, k: int) -> list[dict]:
    """Rows whose every sequence is ``seq_len`` tokens: prompt seq_len/4, response the rest less one (EOS)."""
    words = single_token_words(tokenizer)
    third = len(words) // 3
    prompt_len = seq_len // 4
    response_len = seq_len - prompt_len - 1

    def text(pool, n, offset):
        return "".join(pool[(offset + i) % len(pool)] for i in range(n))

    rows = []
    for i in range(examples):
        prompt = text(words[:third], prompt_len, i)
        chosen = [text(words[third:2 * third], response_len, i + j) for j in range(k)]
        rejected = [text(words[2 * third:], response_len, i + j) for j in range(k)]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected} if k > 1 else
                    {"prompt": prompt, "chosen": chosen[0], "rejected": rejected[0]})
    return rows


def build_model(settings: TextSettings, directory: Path, device) -> int:
    """Saves the tiny tokenizer + a random Llama-layout model of ``settings.shape`` (built on ``device``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmalign_adapter import tiny_tokenizer

    tokenizer = tiny_tokenizer(save_dir=directory)
    shape = dict(settings.shape, vocab_size=max(settings.shape["vocab_size"], len(tokenizer)))
    config = LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    dtype = getattr(torch, settings.dtype)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    return params


def run_bare(model_dir: str, rows: list[dict], k: int, lora: bool, settings: TextSettings, batch_size: int, device):
    """The floor: pre-tokenised equal-length sequences already on the device, policy forward with grad + reference
    forward without, the (m)DPO loss in closed form (SPEC §1, §3), backward, clipping, AdamW (fused on CUDA)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, settings.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    reference = None
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            model.enable_input_require_grads()

    def encode(row):  # sequences of one example: its k chosen, then its k rejected
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        out = []
        for side in ("chosen", "rejected"):
            for response in (row[side] if k > 1 else [row[side]]):
                ids = tokenizer(response, add_special_tokens=False)["input_ids"]
                out.append((prompt + ids + [tokenizer.eos_token_id], len(prompt)))
        return out

    batches = []
    for start in range(0, len(rows), batch_size):
        seqs = [s for row in rows[start:start + batch_size] for s in encode(row)]
        length = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), length), tokenizer.pad_token_id)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, (seq, prompt_len) in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, prompt_len:len(seq)] = True
        batches.append((ids.to(device), (ids != tokenizer.pad_token_id).long().to(device), mask[:, 1:].to(device)))

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def logps(m, ids, attention, mask):
        with autocast:
            logits = m(input_ids=ids, attention_mask=attention).logits[:, :-1]
        token = torch.gather(logits, 2, ids[:, 1:, None]).squeeze(-1).float() - logits.float().logsumexp(-1)
        return (token * mask).sum(-1)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    model.train()
    for step in range(settings.warmup + settings.steps):
        ids, attention, mask = batches[step % len(batches)]
        with torch.no_grad():
            if reference is None:
                with model.disable_adapter():
                    ref = logps(model, ids, attention, mask)
            else:
                ref = logps(reference, ids, attention, mask)
        ratio = (logps(model, ids, attention, mask) - ref).view(-1, 2, k).mean(-1)  # [examples, (chosen, rejected)]
        loss = -F.logsigmoid(BETA * (ratio[:, 0] - ratio[:, 1])).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


def run_case(impl: str, objective: str, lora: bool, seq_len: int, settings: TextSettings, model_dir: str,
             params: int, device, work: Path) -> dict:
    import torch

    from mmalign_adapter import tiny_tokenizer, train_text, write_rows

    summary: dict = {}
    stack = contextlib.ExitStack()

    k = K if objective == "mdpo" else 1
    responses = 2 * k
    batch_size = max(1, settings.tokens_per_step // (seq_len * responses))
    rows = make_rows(tiny_tokenizer(), seq_len, batch_size * (settings.warmup + settings.steps), k)
    tokens = batch_size * responses * seq_len
    allocated_before = reset_peak(device)
    timer = make_step_timer(device)
    try:
        if impl in MMALIGN_VARIANTS:
            data = write_rows(work / "rows.jsonl", rows)
            stack.enter_context(patched(MMALIGN_PATCHES.get(impl, [])))
            summary = train_text(model_dir=model_dir, data_file=str(data), data_format="groups" if k > 1 else "pairs",
                       objective=objective, beta=BETA, lora=lora, lora_targets=LORA_TARGETS,
                       gradient_checkpointing=settings.gradient_checkpointing, batch_size=batch_size,
                       max_steps=settings.warmup + settings.steps, max_length=seq_len, dtype=settings.dtype,
                       mixed_precision="bf16" if settings.dtype == "bfloat16" else "no", learning_rate=LR,
                       output_dir=str(work / "mmalign"), num_threads=settings.threads,
                       overrides=MMALIGN_VARIANTS[impl])
        elif impl == "trl":
            from bench_text_dpo import run_trl

            args = SimpleNamespace(
                batch_size=batch_size, warmup=settings.warmup, steps=settings.steps, loss="dpo", lora=int(lora),
                model="llama", variant="live", pairs=len(rows), rows=rows, dtype=getattr(torch, settings.dtype),
                gradient_checkpointing="on" if settings.gradient_checkpointing else "off",
                trl_overrides={"use_cpu": device.type == "cpu", "bf16": settings.dtype == "bfloat16", "fp16": False,
                               "max_length": None})
            run_trl(args, model_dir, work, timer)
        else:
            run_bare(model_dir, rows, k, lora, settings, batch_size, device)
        times = timer.step_times(settings.warmup)
    finally:
        stack.close()
        timer.handle.remove()
        _reset_accelerate()
    if len(times) != settings.steps:
        raise RuntimeError(f"expected {settings.steps} timed optimizer steps, the hook saw {len(times)}")
    step_s = median(times)
    extra = {"share_prompt": summary.get("share_prompt")} if impl in MMALIGN_VARIANTS else {}
    return {**extra, "step_times_s": times, "median_step_s": step_s, "examples_per_step": batch_size,
            "tokens_per_step": tokens, "tokens_per_s": tokens / step_s, "params": params,
            "model_flops_per_step": 8 * params * tokens,
            "peak_memory_mib": peak_mib(device, getattr(timer, "rss_mib", float("nan"))),
            "allocated_before_mib": allocated_before}


@contextlib.contextmanager
def patched(patches):
    """Sets each (module, attribute, value) for the block, then restores the old values."""
    import importlib

    saved = []
    try:
        for module_name, attribute, value in patches:
            module = importlib.import_module(module_name)
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, value)
        yield
    finally:
        for module, attribute, value in reversed(saved):
            setattr(module, attribute, value)


def _reset_accelerate() -> None:
    """Each trainer builds its own Accelerator; the process-wide accelerate state must not carry over."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # noqa: BLE001 - an older/newer accelerate without it: nothing to reset
        pass


def focused_cases(settings: TextSettings):
    """``--text-plan focused``: which of mmalign's settings costs it its step against TRL on the GPU — the
    shared-prompt layout (a dense [T, T] mask: no flash kernel, no causal skipping), the fused SiLU-gated MLP and
    (added after the first H200 runs, not yet run there) the log-softmax chunk size — at the longest and the
    shortest sequence length, the peers beside each setting. "mmalign" is the library's default for the device."""
    long, short = settings.seq_lens[0], settings.seq_lens[-1]
    plan = [(long, False, "dpo", ("mmalign", "mmalign-noshare-smallchunks", "trl")),
            (long, True, "dpo", ("mmalign", "trl", "mmalign-share")),
            (long, False, "dpo", ("mmalign-share", "mmalign-noshare-nofused", "bare")),
            (long, False, "mdpo", ("mmalign", "mmalign-share")),
            (short, False, "dpo", ("mmalign", "mmalign-share", "trl")),
            (short, True, "dpo", ("mmalign", "trl", "mmalign-share"))]
    seen = set()
    for round_index in range(settings.rounds):
        for seq_len, lora, objective, impls in plan:
            for impl in impls:
                key = (round_index, seq_len, lora, objective, impl)
                if key not in seen:  # the dry run has one length: long == short
                    seen.add(key)
                    yield key


def cases(settings: TextSettings):
    if os.environ.get("GPU_BENCH_TEXT_PLAN") == "focused":
        yield from focused_cases(settings)
        return
    for round_index in range(settings.rounds):
        for seq_len in settings.seq_lens:
            for lora in (True, False):
                for objective in ("dpo", "mdpo"):
                    for impl in IMPLS:
                        yield round_index, seq_len, lora, objective, impl


def run_section(dry_run: bool, log: CaseLog, deadline_at: float, dtype: str | None = None) -> None:
    import torch

    settings = DRY if dry_run else GPU
    if dtype:
        settings = replace(settings, dtype=dtype)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(dry_run)
    runner = CaseRunner(log, deadline_at, "text")
    with tempfile.TemporaryDirectory(prefix="gpu-bench-text-") as tmp:
        model_dir = Path(tmp) / "model"
        params = build_model(settings, model_dir, device)
        log.write({"section": "text", "case": "model", "status": "info", "params": params, "shape": settings.shape_name,
                   "dtype": settings.dtype, "gradient_checkpointing": settings.gradient_checkpointing,
                   "warmup": settings.warmup, "steps": settings.steps, "tokens_per_step": settings.tokens_per_step})
        for round_index, seq_len, lora, objective, impl in cases(settings):
            mode = "lora" if lora else "full"
            name = f"{objective}/{mode}/L{seq_len}/{impl}/round{round_index + 1}"
            labels = dict(impl=impl, objective=objective, finetuning=mode, seq_len=seq_len, round=round_index + 1)
            if impl == "trl" and objective == "mdpo":
                if name not in log.finished():
                    log.write({"section": "text", "case": name, "status": "n/a", **labels,
                               "reason": "TRL 1.16's DPOTrainer has no group (k-wise) objective"})
                continue
            work = Path(tmp) / name.replace("/", "_")
            work.mkdir()
            runner.run(name, impl, lambda: run_case(impl, objective, lora, seq_len, settings, str(model_dir), params,
                                                    device, work), default_estimate=settings.case_estimate_s, **labels)
