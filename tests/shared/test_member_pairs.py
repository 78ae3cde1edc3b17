"""``objective.pairs: members`` (mmalign.shared.objectives.member_pairs; SPEC §1 on SPEC §3's groups): a pairwise
objective on the member pairs of equal-size groups equals that objective on the flattened pairs — loss, per-pair
losses, metrics and gradients — with ragged masks; the errors name the config key."""

import pytest
import torch

import mmalign
from mmalign.shared.compatibility import DataFacts, check_objective_fits_data
from mmalign.shared.objectives import MemberPairs

PAIRWISE = {
    "dpo": {"beta": 0.3},
    "ipo": {"beta": 0.3},
    "cdpo": {"beta": 0.3, "eps": 0.2},
    "rdpo": {"beta": 0.3, "eps": 0.2},
    "hinge": {"beta": 0.3},
    "fdpo": {"beta": 0.3, "divergence": "js"},
    "dpo+nll": {"beta": 0.3, "nll": 0.7},
}


def group_inputs(B=5, k=4, seed=0, ragged=True):
    g = torch.Generator().manual_seed(seed)
    inputs = {name: torch.randn(B, k, generator=g, dtype=torch.float64) * 2 - 3
              for name in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")}
    inputs["chosen_lengths"] = torch.randint(1, 9, (B, k), generator=g)
    if ragged:
        mc = torch.rand(B, k, generator=g) > 0.3
        mr = torch.rand(B, k, generator=g) > 0.3
        mc[:, 0] = mr[:, 0] = True  # every group non-empty and at least one pair per row
        mc[1, 1:] = False  # a chosen group of one
        mr[2, 2] = False
        for name, mask in (("policy_chosen", mc), ("ref_chosen", mc), ("policy_rejected", mr), ("ref_rejected", mr)):
            inputs[name] = torch.where(mask, inputs[name], torch.full_like(inputs[name], float("nan")))  # padding
        inputs["chosen_mask"], inputs["rejected_mask"] = mc, mr
    return inputs


def flattened_pairs(inputs):
    """The pairs (chosen_i, rejected_i) with both members present, written out by hand (the golden reference)."""
    B, k = inputs["policy_chosen"].shape
    mc = inputs.get("chosen_mask", torch.ones(B, k, dtype=torch.bool))
    mr = inputs.get("rejected_mask", torch.ones(B, k, dtype=torch.bool))
    rows = [(b, i) for b in range(B) for i in range(k) if mc[b, i] and mr[b, i]]
    return {name: torch.stack([inputs[name][b, i] for b, i in rows])
            for name in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_lengths")}


def build(label, pairs=None):
    name = label.split("+")[0]
    return mmalign.objective(name, **PAIRWISE[label], **({"pairs": pairs} if pairs else {}))


@pytest.mark.parametrize("ragged", [True, False])
@pytest.mark.parametrize("label", sorted(PAIRWISE))
def test_member_pairs_equal_the_pairwise_objective_on_the_flattened_pairs(label, ragged):
    inputs = group_inputs(ragged=ragged, seed=len(label))
    out = build(label, "members")(**inputs)
    ref = build(label)(**flattened_pairs(inputs))
    assert isinstance(build(label, "members"), MemberPairs)
    n_pairs = ref.losses.numel()
    assert n_pairs < 20 if ragged else n_pairs == 20
    torch.testing.assert_close(out.losses, ref.losses, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    assert out.metrics.keys() == ref.metrics.keys() and "rewards/accuracies" in out.metrics
    assert out.metrics == pytest.approx(ref.metrics, rel=0, abs=0)
    # not the group objective: mDPO's group rewards give another loss on the same inputs
    if label == "dpo" and ragged:
        mdpo = mmalign.objective("mdpo", beta=0.3)(**{k: v for k, v in inputs.items() if k != "chosen_lengths"})
        assert abs(float(mdpo.loss) - float(out.loss)) > 1e-3


@pytest.mark.parametrize("label", ["dpo", "ipo", "dpo+nll"])
def test_member_pairs_gradients_equal_the_flattened_pairs(label):
    base = group_inputs(seed=3)
    grads = []
    for members in (True, False):
        pc = base["policy_chosen"].clone().requires_grad_(True)
        pr = base["policy_rejected"].clone().requires_grad_(True)
        inputs = {**base, "policy_chosen": pc, "policy_rejected": pr}
        if members:
            loss = build(label, "members")(**inputs).loss
        else:
            loss = build(label)(**flattened_pairs(inputs)).loss
        loss.backward()
        grads.append((torch.nan_to_num(pc.grad, nan=0.0), torch.nan_to_num(pr.grad, nan=0.0)))
    (gc, gr), (hc, hr) = grads
    assert gc.abs().sum() > 0 and gr.abs().sum() > 0
    torch.testing.assert_close(gc, hc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gr, hr, rtol=1e-12, atol=1e-12)
    masked = ~(base["chosen_mask"] & base["rejected_mask"])
    assert torch.all(gc[masked] == 0) and torch.all(gr[masked] == 0)  # a half pair gets no gradient


def test_groups_of_one_are_the_pairwise_objective():
    inputs = group_inputs(k=1, ragged=False)
    a = build("ipo", "members")(**inputs)
    b = build("ipo")(**inputs)
    torch.testing.assert_close(a.loss, b.loss)


def test_the_option_reads_from_the_config_section_and_round_trips():
    from mmalign.engine.sections import ObjectiveConfig

    cfg = ObjectiveConfig(name="dpo", hyperparameters={"beta": 0.1, "pairs": "members"})
    obj = mmalign.objective(cfg.name, **cfg.hyperparameters)
    assert isinstance(obj, MemberPairs) and obj.accepts_groups and obj.name == "dpo" and obj.beta == 0.1
    assert obj.hparams == {"beta": 0.1, "nll": 0.0, "pairs": "members"}
    assert repr(obj) == "objective('dpo', beta=0.1, nll=0.0, pairs='members')"
    assert type(mmalign.objective("dpo", beta=0.1, pairs=None)).__name__ == "DPO"
    assert type(mmalign.objective("dpo", beta=0.1, pairs="off")).__name__ == "DPO"


@pytest.mark.parametrize("name, hparams, match", [
    ("mdpo", {"beta": 0.1}, r"objective.pairs: members .* 'mdpo' takes groups itself"),
    ("sft", {}, r"objective.pairs: members .* 'sft' takes groups itself"),
    ("cnrpo", {"beta": 0.1, "alphas": [0.5]}, r"objective.pairs: members does not support 'cnrpo'.*triggered_chosen"),
    ("causal_dpo", {"beta": 0.1, "lam": 1.0}, r"objective.pairs: members does not support 'causal_dpo'.*bins"),
])
def test_the_option_refuses_group_objectives_and_extra_inputs(name, hparams, match):
    with pytest.raises(ValueError, match=match):
        mmalign.objective(name, pairs="members", **hparams)


def test_bad_values_and_inputs_raise_clear_errors():
    from mmalign.engine.sections import ObjectiveConfig

    with pytest.raises(ValueError, match=r"objective.pairs: invalid value 'member'; expected 'members'"):
        mmalign.objective("dpo", beta=0.1, pairs="member")
    with pytest.raises(ValueError, match=r"^objective: objective.pairs: .*'mipo' takes groups itself"):
        ObjectiveConfig(name="mipo", hyperparameters={"beta": 0.1, "pairs": "members"})
    obj = mmalign.objective("dpo", beta=0.1, pairs="members")
    inputs = group_inputs(ragged=False)
    inputs.pop("chosen_lengths")
    with pytest.raises(ValueError, match=r"objective.pairs: members takes no extra inputs; got \['triggered_chosen'\]"):
        obj(**inputs, triggered_chosen=inputs["policy_chosen"])
    uneven = {**inputs, "policy_rejected": inputs["policy_rejected"][:, :3], "ref_rejected": inputs["ref_rejected"][:, :3]}
    with pytest.raises(ValueError, match=r"objective.pairs: members .* equal sizes; got 4 chosen and 3 rejected"):
        obj(**uneven)
    mc = torch.zeros(5, 4, dtype=torch.bool)
    mc[:, 0] = True
    mr = ~mc
    with pytest.raises(ValueError, match=r"no member pair has both its chosen and its rejected member"):
        obj(**inputs, chosen_mask=mc, rejected_mask=mr)
    with pytest.raises(ValueError, match=r"chosen_lengths must have the shape of policy_chosen"):
        mmalign.objective("dpo", beta=0.1, nll=1.0, pairs="members")(**inputs, chosen_lengths=torch.ones(5))


def test_the_data_check_lets_groups_through_only_with_the_option():
    groups = DataFacts(source="g.jsonl", group_sizes=(6, 6))
    with pytest.raises(ValueError, match=r"'dpo' is pairwise; use objective.name mdpo or mipo, or objective.pairs: "
                                         r"members"):
        check_objective_fits_data(mmalign.objective("dpo", beta=0.1), groups)
    check_objective_fits_data(mmalign.objective("dpo", beta=0.1, pairs="members"), groups)
    check_objective_fits_data(mmalign.objective("dpo", beta=0.1, pairs="members"), DataFacts(source="p.jsonl"))
    with pytest.raises(ValueError, match=r"g.jsonl: objective.pairs: members .* up to 6 chosen and 4 rejected"):
        check_objective_fits_data(mmalign.objective("ipo", beta=0.1, pairs="members"),
                                  DataFacts(source="g.jsonl", group_sizes=(6, 4)))
    with pytest.raises(ValueError, match=r"triggers are for objective cnrpo"):
        check_objective_fits_data(mmalign.objective("dpo", beta=0.1, pairs="members"),
                                  DataFacts(source="g.jsonl", group_sizes=(2, 2), triggers=("<T>",)))
