"""The reference policies: adapter-disabled base, separate frozen model, precomputed log-probs."""
import pytest
import torch

from mmalign.testing import build_tiny_causal_lm, tiny_preference_rows, write_jsonl
from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
from mmalign.text.modeling.logprobs import sequence_logprobs
from mmalign.text.modeling.loading import apply_lora, load_causal_lm
from mmalign.text.modeling.references import AdapterReference, FrozenModelReference, model_fingerprint, precompute_reference_logps


def _batch(tokenizer, kind="pairs", n=4):
    examples, _ = parse_preference_rows(tiny_preference_rows(n, kind=kind, seed=5))
    return PreferenceCollator(tokenizer.pad_token_id)(PreferenceTokenizer(tokenizer)(examples))


def _logps(model, batch):
    with torch.no_grad():
        return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])[0]


def test_adapter_disabled_reference_equals_base_model(tiny_model_dir, tiny_tokenizer):
    base = load_causal_lm(str(tiny_model_dir)).eval()
    policy = apply_lora(load_causal_lm(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # move the adapters away from their zero init so the policy differs from the base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = _batch(tiny_tokenizer, "groups")
    expected = _logps(base, batch)
    reference = AdapterReference(policy)(policy, batch)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logps(policy, batch), expected, atol=1e-3)  # adapters are back on afterwards
    assert not reference.requires_grad


def test_adapter_reference_needs_lora(tiny_model_dir):
    with pytest.raises(ValueError, match="PEFT"):
        AdapterReference(load_causal_lm(str(tiny_model_dir)))


def test_frozen_model_reference(tiny_model_dir, tiny_tokenizer):
    model = load_causal_lm(str(tiny_model_dir))
    batch = _batch(tiny_tokenizer)
    reference = FrozenModelReference(load_causal_lm(str(tiny_model_dir)))
    torch.testing.assert_close(reference(model, batch), _logps(model.eval(), batch))
    assert not any(p.requires_grad for p in reference.model.parameters())


def test_precomputed_reference_matches_live_and_caches(tiny_model_dir, tiny_tokenizer, tmp_path):
    from mmalign.text.data import load_preference_dataset

    path = write_jsonl(tmp_path / "g.jsonl", tiny_preference_rows(6, kind="groups", seed=1))
    dataset = load_preference_dataset(str(path), tiny_tokenizer)
    collator = PreferenceCollator(tiny_tokenizer.pad_token_id)
    reference = FrozenModelReference(load_causal_lm(str(tiny_model_dir)))
    cache = tmp_path / "cache" / "ref.pt"
    info = precompute_reference_logps(reference, reference.model, dataset, collator, batch_size=4,
                                      device=torch.device("cpu"), cache_path=cache, show_progress=False)
    assert not info["cache_hit"] and cache.exists()
    batch = collator([dataset[i] for i in range(len(dataset))])
    live = reference(None, batch)
    from mmalign.text.modeling.logprobs import gather_groups

    torch.testing.assert_close(batch["ref_chosen"][batch["chosen_mask"]],
                               gather_groups(live, batch["chosen_index"])[batch["chosen_mask"]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["ref_rejected"][batch["rejected_mask"]],
                               gather_groups(live, batch["rejected_index"])[batch["rejected_mask"]], rtol=1e-5, atol=1e-5)
    # second call: served from the cache without a forward
    for item in dataset.items:
        item.pop("ref_chosen"), item.pop("ref_rejected")
    calls = []
    handle = reference.model.register_forward_hook(lambda *a: calls.append(1))
    info = precompute_reference_logps(reference, reference.model, dataset, collator, batch_size=4,
                                      device=torch.device("cpu"), cache_path=cache, show_progress=False)
    handle.remove()
    assert info["cache_hit"] and not calls and "ref_chosen" in dataset[0]


def test_model_fingerprint_tracks_weights(tiny_model_dir):
    a = load_causal_lm(str(tiny_model_dir))
    b = load_causal_lm(str(tiny_model_dir))
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        next(b.parameters())[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_adapters_disabled_matches_peft_disable_adapter_and_restores_training_state(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from mmalign.text.modeling.references import adapters_disabled

    model = get_peft_model(build_tiny_causal_lm(tokenizer=tiny_tokenizer, seed=2),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            expected = model(ids).logits
        with adapters_disabled(model):
            ours = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(ours, expected)
    assert (ours - adapted).abs().max() > 1e-3  # the adapter does change the output...
    torch.testing.assert_close(after, adapted)  # ...and is back on afterwards, trainable
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
