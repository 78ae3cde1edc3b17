import os, sys, tempfile, traceback, collections
from pathlib import Path
sys.path.insert(0, "bench")
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from bench_text_dpo import LR, lora_targets, model_path, synthetic_pairs
import mmalign.text.modeling.logprobs as logprobs
from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
from mmalign.text.modeling.loading import apply_lora, load_causal_lm, load_tokenizer
from mmalign.text.modeling.references import AdapterReference
torch.set_num_threads(2)
lora = "--full" not in sys.argv
with tempfile.TemporaryDirectory() as tmp:
    path = model_path("tiny", Path(tmp)); tok = load_tokenizer(path); model = load_causal_lm(path)
import copy
from mmalign.text.modeling.references import FrozenModelReference
if lora:
    model = apply_lora(model, r=8, alpha=16, dropout=0.0, target_modules=lora_targets("tiny")); ref_fn = AdapterReference(model)
else:
    ref_fn = FrozenModelReference(copy.deepcopy(model).requires_grad_(False))
model.train()
ex, _ = parse_preference_rows(synthetic_pairs(8))
batch = PreferenceCollator(tok.pad_token_id, share_prompt=True)(PreferenceTokenizer(tok)(ex))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=LR, fused=True)
counts = collections.Counter()
class Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [a.numel() for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
        if sizes and max(sizes) >= 32768:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            counts[(str(func.overloadpacket.__name__), where)] += 1
        return out
def step(log):
    b = dict(batch)
    ctx = Mode() if log else torch.no_grad.__class__  # placeholder
    import contextlib
    with (Mode() if log else contextlib.nullcontext()):
        ref = ref_fn(model, b)
        pol, _ = logprobs.batch_logprobs(model, b)
        rho = pol - ref
        margin = rho[b["chosen_index"][:, 0]] - rho[b["rejected_index"][:, 0]]
        loss = F.softplus(-0.1 * margin).mean()
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
for _ in range(3): step(False)
step(True)
tot = sum(counts.values())
print("ops >= 32768 elements in one step:", tot)
for (op, where), n in counts.most_common(60): print(f"{n:4d} {op:40s} {where}")
