"""Response log-likelihoods: the memory-efficient gather and the concatenated forward."""
import pytest
import torch

from mmalign.testing import build_tiny_causal_lm, tiny_preference_rows
from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
from mmalign.text.modeling.logprobs import gather_groups, sequence_logprobs, token_logprobs


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_token_logprobs_match_log_softmax_values_and_gradients(chunk_rows):
    torch.manual_seed(0)
    logits = torch.randn(11, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (11,))
    weights = torch.randn(11, dtype=torch.float64)
    ours = token_logprobs(logits, labels, chunk_rows)
    (ours.double() * weights).sum().backward()
    grad_ours = logits.grad.clone()
    logits.grad = None
    ref = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    (ref * weights).sum().backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, logits.grad, rtol=1e-6, atol=1e-6)


def test_bf16_logits_are_scored_in_float32():
    torch.manual_seed(1)
    logits = torch.randn(7, 300) * 4
    labels = torch.randint(0, 300, (7,))
    ours = token_logprobs(logits.bfloat16(), labels, 2)
    exact = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_concatenated_forward_equals_separate_forwards(tiny_tokenizer, arch):
    model = build_tiny_causal_lm(arch=arch, tokenizer=tiny_tokenizer, seed=3).eval()
    examples, _ = parse_preference_rows(tiny_preference_rows(5, kind="groups", seed=4))
    items = PreferenceTokenizer(tiny_tokenizer)(examples)
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(items)
    with torch.no_grad():
        joint, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                          logits_start=batch["logits_start"])
        # the same without the logits_to_keep shortcut
        full, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                    logits_start=0)
        chosen = gather_groups(joint, batch["chosen_index"])
        for b, item in enumerate(items):
            for j, response in enumerate(item["chosen_ids"]):
                ids = torch.tensor([item["prompt_ids"] + response])
                logits = model(ids).logits[0, :-1].double()
                expected = torch.log_softmax(logits, -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
                expected = expected[len(item["prompt_ids"]) - 1:].sum()
                assert float(chosen[b, j]) == pytest.approx(float(expected), rel=1e-4, abs=1e-4)
                assert int(counts[batch["chosen_index"][b, j]]) == len(response)
    torch.testing.assert_close(joint, full, rtol=1e-5, atol=1e-5)
    assert (chosen[~batch["chosen_mask"]] == 0).all()


def test_gradients_flow_only_through_response_positions(tiny_tokenizer):
    model = build_tiny_causal_lm(tokenizer=tiny_tokenizer, seed=0)
    examples, _ = parse_preference_rows(tiny_preference_rows(2, kind="pairs"))
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(PreferenceTokenizer(tiny_tokenizer)(examples))
    embeddings = model.get_input_embeddings()
    captured = {}
    hook = embeddings.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    logps, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    captured["out"].retain_grad()
    logps.sum().backward()
    hook.remove()
    grad = captured["out"].grad.abs().sum(-1)
    # The last token of each sequence predicts nothing that is scored, and padding is never read.
    lengths = batch["attention_mask"].sum(-1)
    for row, length in enumerate(lengths.tolist()):
        assert grad[row, length - 1] == 0
        assert (grad[row, length:] == 0).all()


def test_peft_wrapped_model_gets_logits_to_keep_with_same_logprobs(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from mmalign.text.modeling import logprobs

    base = build_tiny_causal_lm(tokenizer=tiny_tokenizer, seed=5)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()  # non-zero LoRA delta
    assert logprobs._accepts_logits_to_keep(model)
    examples, _ = parse_preference_rows(tiny_preference_rows(4, kind="pairs", seed=6))
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(PreferenceTokenizer(tiny_tokenizer)(examples))
    assert batch["logits_start"] > 0
    seen = []
    hook = model.get_base_model().register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("logits_to_keep")),
                                                            with_kwargs=True)
    with torch.no_grad():
        short, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                     logits_start=batch["logits_start"])
        full, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                    logits_start=0)
    hook.remove()
    assert seen == [batch["input_ids"].shape[1] - batch["logits_start"], None]
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def _head_logits(seed: int, rows: int = 9, width: int = 6, vocab: int = 40):
    """float32 logits made by a linear head from hidden rows (an MmBackward0 output, as the LM head gives)."""
    torch.manual_seed(seed)
    hidden = torch.randn(rows, width, requires_grad=True)
    head = torch.randn(vocab, width, requires_grad=True)
    return hidden, head, hidden @ head.t(), torch.randint(0, vocab, (rows,))


@pytest.mark.parametrize("chunk_rows", [None, 1, 4])
def test_in_place_backward_equals_allocating_backward_and_unchunked(chunk_rows):
    weights = torch.randn(9)
    grads = {}
    for reuse in (False, True):
        hidden, head, logits, labels = _head_logits(5)
        lp = token_logprobs(logits, labels, chunk_rows, reuse_logits=reuse)
        (lp * weights).sum().backward()
        grads[reuse] = (lp.detach(), hidden.grad, head.grad)
    hidden, head, logits, labels = _head_logits(5)
    exact = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    (exact * weights).sum().backward()
    for got in grads.values():
        torch.testing.assert_close(got[0], exact.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], hidden.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[2], head.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)  # the same kernels on the same numbers: bit-identical


def test_in_place_backward_writes_into_the_logits_and_only_when_allowed():
    seen = {}

    def keep(grad):
        seen["ptr"] = grad.data_ptr()

    hidden, head, logits, labels = _head_logits(6)
    logits.register_hook(keep)
    token_logprobs(logits, labels, reuse_logits=True).sum().backward()
    assert seen["ptr"] == logits.data_ptr()  # no second [M, V] tensor

    # a leaf (the caller may read it again) or a non-fresh output is never overwritten
    leaf = torch.randn(5, 30, requires_grad=True)
    before = leaf.detach().clone()
    token_logprobs(leaf, torch.randint(0, 30, (5,)), reuse_logits=True).sum().backward()
    assert torch.equal(leaf.detach(), before) and leaf.grad.data_ptr() != leaf.data_ptr()

    # a second backward through the same graph fails loudly instead of reading overwritten logits
    hidden, head, logits, labels = _head_logits(7)
    lp = token_logprobs(logits, labels, reuse_logits=True).sum()
    lp.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.backward()


def test_in_place_backward_of_bf16_logits_equals_the_allocating_one():
    grads = {}
    for reuse in (False, True):
        hidden, head, logits, labels = _head_logits(8)
        hidden_bf16 = hidden.detach().bfloat16().requires_grad_()
        logits = hidden_bf16 @ head.detach().bfloat16().t()
        token_logprobs(logits, labels, 2, reuse_logits=reuse).sum().backward()
        grads[reuse] = hidden_bf16.grad
    assert torch.equal(grads[False], grads[True])


def test_log_softmax_chunks_are_large_on_accelerators():
    from mmalign.text.modeling.logprobs import default_chunk_rows

    # 128k vocabulary (Llama 3): 32 rows per chunk on the CPU (16 MiB of float32); on an accelerator 523 rows, so a
    # 12k-row step is 24 chunks instead of ~400 (the H200 run, bench/RESULTS.md "GPU")
    assert default_chunk_rows(torch.empty(12288, 128256)) == 32
    assert default_chunk_rows(torch.empty(12288, 128256, device="meta")) == 523
    assert default_chunk_rows(torch.empty(4, 1 << 30, device="meta")) == 1  # never zero rows
