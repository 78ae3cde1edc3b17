"""mmalign.text.modeling.sampling and mmalign.text.evaluation.evaluate: batched sampling, answer metrics, preference ECE, judges."""
import json

import pytest
import torch

from mmalign.text.evaluation.evaluate import (
    answer_metrics,
    format_prompts,
    length_bias_metrics,
    evaluate,
    judge_metrics,
    load_judge,
    longer_length_ratio,
    main,
    preference_metrics,
    rng_metrics,
)
from mmalign.text.modeling.sampling import Samples, sample_completions


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from mmalign.text.evaluation.evaluate import load_model_for_eval

    return load_model_for_eval(str(tiny_model_dir))


PROMPTS = ["Pick a random number between 1 and 10.", "Human: How do I bake bread? Assistant:", "Say hello."]


def test_greedy_sampling_matches_generate_for_left_padded_prompts_of_different_lengths(tiny):
    model, tokenizer = tiny
    ours = sample_completions(model, tokenizer, PROMPTS, n=2, max_new_tokens=6, temperature=0, batch_size=4)
    for prompt, texts, lengths in zip(PROMPTS, ours.texts, ours.num_tokens):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            reference = model.generate(**ids, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
        new = reference[0, ids["input_ids"].shape[1]:].tolist()
        stops = [i for i, t in enumerate(new) if t == tokenizer.eos_token_id]
        new = new[: stops[0]] if stops else new
        assert texts == [tokenizer.decode(new, skip_special_tokens=True)] * 2
        assert lengths == [len(new)] * 2


def test_sampling_is_seeded_and_shaped(tiny):
    model, tokenizer = tiny
    a = sample_completions(model, tokenizer, PROMPTS, n=5, max_new_tokens=4, seed=3, batch_size=16)
    b = sample_completions(model, tokenizer, PROMPTS, n=5, max_new_tokens=4, seed=3, batch_size=16)
    c = sample_completions(model, tokenizer, PROMPTS, n=5, max_new_tokens=4, seed=4, batch_size=16)
    assert a.texts == b.texts and a.texts != c.texts
    assert [len(t) for t in a.texts] == [5, 5, 5] and all(0 <= n <= 4 for row in a.num_tokens for n in row)
    assert all(e > 0 for row, lens in zip(a.token_entropy, a.num_tokens) for e, n in zip(row, lens) if n)
    # Chunking (a prompt split across batches) keeps the per-prompt grouping.
    split = sample_completions(model, tokenizer, PROMPTS, n=5, max_new_tokens=4, seed=3, batch_size=2)
    assert [len(t) for t in split.texts] == [5, 5, 5]
    with pytest.raises(ValueError):
        sample_completions(model, tokenizer, PROMPTS, n=0)
    with pytest.raises(ValueError):
        sample_completions(model, tokenizer, PROMPTS, top_p=0)


def test_tiny_top_p_is_greedy(tiny):
    model, tokenizer = tiny
    greedy = sample_completions(model, tokenizer, PROMPTS[:1], n=3, max_new_tokens=4, temperature=0)
    nucleus = sample_completions(model, tokenizer, PROMPTS[:1], n=3, max_new_tokens=4, top_p=1e-6, seed=9)
    assert nucleus.texts == greedy.texts


def test_answer_metrics_on_hand_made_samples():
    samples = Samples(texts=[["a b", "a c"], ["x y z", "x y z"]], num_tokens=[[2, 4], [3, 3]],
                      token_entropy=[[1.0, 3.0], [0.5, 0.5]], finished=[[True, False], [True, True]])
    baseline = Samples(texts=[["q", "q"], ["q", "q"]], num_tokens=[[1, 5], [3, 1]],
                       token_entropy=[[0, 0], [0, 0]], finished=[[True] * 2] * 2)
    out = answer_metrics(samples, baseline=baseline)
    assert out["avg_length_tokens"] == pytest.approx(3.0)
    assert out["distinct_1"] == pytest.approx((3 / 4 + 3 / 6) / 2)  # per prompt, whitespace words
    assert out["distinct_2"] == pytest.approx((2 / 2 + 2 / 4) / 2)
    # "a b" vs "a c": p1 = 1/2, p2 = (0+1)/(1+1) (BLEU+1), p3 = p4 = 1 (shorter than n) -> 2^-0.5; identical -> 1
    assert out["self_bleu"] == pytest.approx((2 ** -0.5 + 1) / 2)
    assert out["predictive_entropy"] == pytest.approx(5 / 4)
    assert out["finished_rate"] == pytest.approx(3 / 4)
    assert out["longer_length_ratio"] == pytest.approx(2 / 4)  # 2>1, 4<5, 3=3, 3>1


def test_longer_length_ratio_needs_paired_answers():
    assert longer_length_ratio([[3, 1]], [[2, 2]]) == 0.5
    with pytest.raises(ValueError):
        longer_length_ratio([[3, 1]], [[2]])


def test_length_bias_metrics_known_answer():
    out = length_bias_metrics(["It is 4.", "5 or 6", "The answer is -3."], [4, 10, 6], [5, 3, 6], [4, 5, -3])
    assert out == {"avg_length_tokens": pytest.approx(20 / 3), "longer_than_sft": pytest.approx(1 / 3),
                   "target_accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        length_bias_metrics(["4"], [1], [1, 2], [4])


def test_evaluation_prompts_are_rendered_as_in_training(tiny_tokenizer):
    from mmalign.text.data import PreferenceTokenizer, parse_preference_rows, render_prompt

    hh = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bake bread?\n\nAssistant:"
    examples, _ = parse_preference_rows([{"prompt": hh, "chosen": " Yes.", "rejected": " No."}])
    for chat in (False, True):
        trained = PreferenceTokenizer(tiny_tokenizer, use_chat_template=chat, system_prompt="Be kind.")(examples)[0]
        text, special = render_prompt(tiny_tokenizer, hh, use_chat_template=chat, system_prompt="Be kind.")
        assert special is not chat
        assert tiny_tokenizer(text, add_special_tokens=special)["input_ids"] == trained["prompt_ids"]
        assert format_prompts(tiny_tokenizer, [hh], use_chat_template=chat, system_prompt="Be kind.") == [text]
    assert "Human:" not in text and text.count("<|user|>") == 2  # the dialogue is split into turns


def test_rng_metrics_average_over_prompts():
    out = rng_metrics([[" 1", " 2"], [" 5", " 5", "no"]], [(1, 2), (5, 6)])
    assert out["rng/normalized_entropy"] == pytest.approx(0.5)
    assert out["rng/out_of_range_rate"] == pytest.approx(1 / 6)
    assert len(out["rng/per_prompt_entropy"]) == 2


def test_judge_metrics_with_a_callable_judge():
    def judge(prompts, responses):
        return [len(r) for r in responses]

    out = judge_metrics(judge, ["p", "q"], [["long answer", "x"], ["abc", "abc"]], [["short", "xx"], ["abc", "ab"]])
    # wins: 11>5, 3>2; losses: 1<2; tie: 3=3 -> win rate (2 + 0.5)/4, judge score 50 + (2-1)/4*100
    assert out["judge/win_rate"] == pytest.approx(0.625) and out["judge/score"] == pytest.approx(75.0)
    assert load_judge(judge) is judge
    assert load_judge("json:dumps", allow_code_hooks=True) is json.dumps
    with pytest.raises(ValueError):
        load_judge("not a judge")


def test_reward_model_judge_from_a_local_folder(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from mmalign.text.evaluation.evaluate import RewardModelJudge

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    judge = load_judge(str(tmp_path / "rm"))
    assert isinstance(judge, RewardModelJudge)
    scores = judge(["a", "b", "c"], [" yes", " no no no", " maybe"])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)


def test_preference_metrics_with_identical_answers_are_exactly_uncertain(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": " same", "rejected": " same"}) + "\n" for p in PROMPTS))
    out = preference_metrics(model, tokenizer, str(path))
    # Equal scores: p = 0.5, the prediction "chosen" counts as correct but never as more likely.
    assert out["preference/accuracy"] == 0 and out["preference/ece"] == pytest.approx(0.5)
    path.write_text("".join(json.dumps({"prompt": p, "chosen": " Sure! Here is", "rejected": " no"}) + "\n" for p in PROMPTS))
    out = preference_metrics(model, tokenizer, str(path))
    assert 0 <= out["preference/accuracy"] <= 1 and 0 <= out["preference/ece"] <= 1 and out["preference/num_pairs"] == 3


def test_evaluate_end_to_end_and_cli(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "low": 1, "high": 10}) + "\n" for p in PROMPTS))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Say hello.", "chosen": " hello thanks", "rejected": " no"}) + "\n")
    config = {"model": str(tiny_model_dir), "baseline": str(tiny_model_dir), "prompts": str(prompts),
              "preference_data": str(pairs), "sampling": {"num_samples": 3, "max_new_tokens": 4},
              "output_dir": str(tmp_path / "eval")}
    results = evaluate(config, judge=lambda p, r: [len(x) for x in r])
    # Same model and seed as the baseline: identical answers, so every comparison is a tie.
    assert results["longer_length_ratio"] == 0 and results["judge/win_rate"] == 0.5
    assert results["rng/win_rate_vs_baseline"] == 0.5 and results["judge/score"] == 50
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["preference/num_pairs"] == 1
    assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 3

    (tmp_path / "eval.yaml").write_text(
        f"model: {tiny_model_dir}\nprompts: {prompts}\nsampling: {{num_samples: 2, max_new_tokens: 3}}\n"
        f"output_dir: {tmp_path / 'cli'}\n"
    )
    assert main(["--config", str(tmp_path / "eval.yaml")]) == 0
    assert "distinct_1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])


def test_config_needs_something_to_evaluate(tmp_path):
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="nothing to evaluate"):  # before any model loads: "x" is no model
        evaluate({"model": "x", "output_dir": str(tmp_path)})


def test_evaluate_length_bias_reads_a_lora_adapter_folder_like_its_merged_model(tiny_model_dir, tmp_path):
    """A LoRA run's final/ (adapter only, no tokenizer) is evaluated on its base model: the same greedy answers and
    metrics as the merged full model, and different answers from the SFT (base) model."""
    from mmalign.text.evaluation.evaluate import evaluate_length_bias
    from mmalign.text.modeling.loading import apply_lora, load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    model = apply_lora(load_causal_lm(str(tiny_model_dir)), r=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():  # a fresh adapter is the identity (B = 0); make it change the answers
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "tokenizer_config.json").exists()
    merged_dir = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(merged_dir)

    questions = [{"prompt": "What is 2 + 3?", "answer": 5}, {"prompt": "How much is 9 minus 4?", "answer": 5},
                 {"prompt": "What is 3 times 4?", "answer": 12}]
    table = evaluate_length_bias({"LoRA": adapter_dir, "merged": merged_dir}, tiny_model_dir, questions,
                                 use_chat_template=False, max_new_tokens=8)
    assert list(table) == ["SFT", "LoRA", "merged"]
    assert table["LoRA"]["answers"] == table["merged"]["answers"]
    assert {k: v for k, v in table["LoRA"].items()} == {k: v for k, v in table["merged"].items()}
    assert table["LoRA"]["answers"] != table["SFT"]["answers"]
    assert len(table["SFT"]["answers"]) == 3 and table["SFT"]["longer_than_sft"] == 0.0


def test_margin_shifts_measure_the_move_from_the_sft_model_pair_by_pair(tiny, tiny_model_dir, tmp_path):
    """SFT against itself shifts by exactly 0; a model trained toward the chosen answers shifts up, and the summed
    margins equal log-likelihoods computed directly."""
    from mmalign.text.evaluation.evaluate import margin_shifts, pair_logprobs
    from mmalign.text.data import load_preference_dataset
    from mmalign.text.modeling.logprobs import sequence_logprobs
    from mmalign.text.modeling.loading import load_causal_lm, load_tokenizer

    model, tokenizer = tiny
    rows = [{"prompt": p, "chosen": " Sure! Here is a longer answer.", "rejected": " no"} for p in PROMPTS]
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_preference_dataset(str(path), tokenizer)
    scores = pair_logprobs(model, tokenizer, dataset)
    item = dataset[0]
    ids = torch.tensor([item["prompt_ids"] + item["chosen_ids"][0]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(item["prompt_ids"]):] = True
    with torch.no_grad():
        direct, count = sequence_logprobs(model, ids, torch.ones_like(ids), mask)
    assert scores["chosen"][0] == pytest.approx(float(direct[0]), abs=1e-4)
    assert scores["chosen_tokens"][0] == float(count[0])

    trained = load_causal_lm(str(tiny_model_dir))
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05)
    chosen = torch.tensor([dataset[i]["prompt_ids"] + dataset[i]["chosen_ids"][0] for i in range(1)])
    for _ in range(5):  # raise the first chosen answer's likelihood a little
        loss = trained(chosen, labels=chosen).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained_dir = tmp_path / "trained"
    trained.save_pretrained(trained_dir)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(trained_dir)
    table = margin_shifts({"trained": trained_dir}, tiny_model_dir, str(path), use_chat_template=False)
    assert table["SFT"]["shift_from_sft"] == 0 and table["SFT"]["share_rose"] == 0 and table["SFT"]["pairs"] == 3
    assert table["trained"]["shift_from_sft"] > 0 and table["trained"]["share_rose"] > 0
    assert table["SFT"]["mean_margin"] == pytest.approx(
        sum(c - r for c, r in zip(scores["chosen"], scores["rejected"])) / 3, abs=1e-4)
