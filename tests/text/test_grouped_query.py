"""Grouped-query attention through sdpa's enable_gqa instead of transformers' repeat_kv copies (issue #20)."""
import logging

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import transformers.integrations.sdpa_attention as sdpa_attention
from mmalign.text.modeling import fallbacks
from mmalign.text.modeling.grouped_query import GROUPED_QUERY_SDPA, grouped_query_sdpa

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 12  # two heads per group: repeat_kv copies (one would be a view)


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=HEADS * HEAD_DIM, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _run(model, ids, mask, gqa: bool):
    model.zero_grad()
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.__setitem__(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) or t, lambda t: t):
        if gqa:
            with grouped_query_sdpa(model):
                logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved.values())


def test_enable_gqa_gives_the_outputs_and_gradients_of_repeat_kv_keeping_less(monkeypatch):
    model = _model()
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones(2, 1, 11, 11, dtype=torch.bool).tril()  # a 4D mask, as the shared-prompt layout gives
    mask[1, :, :, :2] = False
    mask[1, :, torch.arange(11), torch.arange(11)] = True
    repeats = []
    original = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: repeats.append(n) or original(x, n))
    plain_logits, plain_grads, plain_saved = _run(model, ids, mask, gqa=False)
    assert repeats == [HEADS // KV_HEADS] * 2 * LAYERS
    fallbacks.reset_warnings()
    gqa_logits, gqa_grads, gqa_saved = _run(model, ids, mask, gqa=True)
    assert len(repeats) == 2 * LAYERS  # no copies under the fast path
    assert fallbacks.FAST_PATH_CALLS[GROUPED_QUERY_SDPA] == 1
    assert torch.equal(gqa_logits, plain_logits)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(gqa_grads[name], grad, rtol=1e-5, atol=1e-7)
    # sdpa keeps the KV_HEADS key/value heads instead of HEADS copies: 2 x (HEADS - KV_HEADS) heads less per layer
    assert plain_saved - gqa_saved == LAYERS * 2 * (HEADS - KV_HEADS) * HEAD_DIM * ids.numel() * 4
    _run(model, ids, mask, gqa=False)  # outside the block transformers decides again
    assert len(repeats) == 4 * LAYERS


def test_blocks_of_other_threads_and_any_closing_order_leave_each_forward_its_own_setting(monkeypatch):
    """Two threads enter and leave in crossed order; a forward outside any block (in either thread, at any time)
    copies the key/value heads as transformers decides, one inside its own block does not."""
    import threading

    model = _model()
    ids, mask = torch.randint(0, 97, (1, 9)), torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    repeats = []
    original = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: repeats.append(threading.get_ident()) or original(x, n))
    a_inside, b_done, a_may_leave = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with grouped_query_sdpa(model):
            a_inside.set()
            b_done.wait(30)
            before = len(repeats)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            seen["a_inside_copies"] = len(repeats) - before
            a_may_leave.wait(30)

    def thread_b():
        a_inside.wait(30)
        cm = grouped_query_sdpa(model)
        cm.__enter__()
        cm.__exit__(None, None, None)  # closes while A's block is still open
        before = len(repeats)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # outside any block of its own thread
        seen["b_outside_copies"] = len(repeats) - before
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    threads[1].join(60)
    a_may_leave.set()
    threads[0].join(60)
    assert seen == {"a_inside_copies": 0, "b_outside_copies": 2 * LAYERS}
    before = len(repeats)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(repeats) - before == 2 * LAYERS  # nothing leaked after both closed


def test_without_transformers_hook_it_runs_as_before_and_says_why(monkeypatch, caplog):
    model = _model()
    monkeypatch.delattr(sdpa_attention, "use_gqa_in_sdpa")
    fallbacks.reset_warnings()
    ids = torch.randint(0, 97, (1, 7))
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        for _ in range(2):
            with grouped_query_sdpa(model):
                pass
    assert not fallbacks.FAST_PATH_CALLS[GROUPED_QUERY_SDPA]
    assert [r.getMessage() for r in caplog.records if GROUPED_QUERY_SDPA in r.getMessage()] == [
        f"fast path {GROUPED_QUERY_SDPA} not taken: transformers.integrations.sdpa_attention.use_gqa_in_sdpa is gone "
        "(transformers changed): key/value heads are copied per query head"]
    del ids
