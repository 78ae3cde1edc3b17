"""The debiasing pipeline (``mmalign_experiments.debias``): occupations split, group construction, the report's metrics on
hand-made predictions, the denoising-loss drift, and a short end-to-end run of the command on the shipped model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmalign.config import ConfigError, load_config
from mmalign.image.classifiers import AttributePrediction
from mmalign_experiments.debias.config import DebiasConfig, GroupsConfig
from mmalign_experiments.debias.groups import pairs_from_groups, plan_groups, select_chosen
from mmalign_experiments.debias.measure import average_stats, diversity_stats
from mmalign_experiments.debias.occupations import select_occupations, split_occupations
from mmalign.image.face_model.prompts import Occupation, portrait_prompt


def _prediction(attribute, probabilities, face_found=True, threshold=0.8):
    label = max(probabilities, key=probabilities.get)
    confidence = probabilities[label]
    return AttributePrediction(attribute, label if face_found else None, confidence if face_found else 0.0,
                               probabilities, face_found, confidence < threshold or not face_found)


def _gender(label, confidence=0.9, face_found=True):
    other = "female" if label == "male" else "male"
    return _prediction("gender", {label: confidence, other: 1 - confidence}, face_found)


def _race(label, confidence=0.9, face_found=True):
    probabilities = {r: (1 - confidence) / 3 for r in ("white", "black", "asian", "other")}
    probabilities[label] = confidence
    return _prediction("race", probabilities, face_found)


# ------------------------------------------------------------------------------------------------ occupations
def test_split_is_stratified_disjoint_and_seeded():
    occupations = select_occupations(50)
    assert len(occupations) == 50
    shares = [o.bls_share_women for o in occupations]
    assert min(shares) < 0.1 and max(shares) > 0.9  # spread over the BLS range
    split = split_occupations(occupations, 0.2, seed=0)
    assert len(split.eval) == 10 and len(split.train) == 40
    assert not {o.name for o in split.eval} & {o.name for o in split.train}
    assert split_occupations(occupations, 0.2, seed=0) == split
    assert split_occupations(occupations, 0.2, seed=1).eval != split.eval
    # one held-out occupation per fifth of the BLS ordering
    ordered = sorted(occupations, key=lambda o: (o.bls_share_women, o.name))
    strata = [ordered.index(o) // 5 for o in split.eval]
    assert sorted(strata) == list(range(10))


def test_named_occupations_must_exist():
    with pytest.raises(ValueError, match="not in the occupations file"):
        select_occupations(0, ["nurse", "no-such-job"])


# ------------------------------------------------------------------------------------------------ groups
def test_groups_are_balanced_over_race_and_gender_and_filtered_by_the_classifier():
    config = GroupsConfig(groups_per_occupation=2, candidates_per_cell=2, rejected_per_group=6, min_chosen=4,
                          filter="attributes", balance_genders=False)
    occupations = [Occupation("nurse", 0.9, ""), Occupation("carpenter", 0.02, "")]
    plans = plan_groups(occupations, config)
    assert len(plans) == 4
    seeds = [seed for plan in plans for cands in plan.candidates.values() for _, seed in cands]
    seeds += [seed for plan in plans for _, seed in plan.rejected]
    assert len(set(seeds)) == len(seeds)  # every image its own seed
    for plan in plans:
        assert sorted(plan.candidates) == sorted((r, g) for r in config.races for g in config.genders)
        for (race, gender), cands in plan.candidates.items():
            assert all(prompt == portrait_prompt(plan.occupation.name, race, gender) for prompt, _ in cands)
        assert all(prompt == portrait_prompt(plan.occupation.name) for prompt, _ in plan.rejected)

    # a fake classifier that reads the requested cell back from the file name, except for the first candidate of
    # "white female" cells (it sees a man) and every candidate of "asian male" in the first group (both wrong)
    keys = [key for plan in plans for cands in plan.candidates.values() for key in cands]
    keys += [key for plan in plans for key in plan.rejected]
    files = {key: f"{key[0]}|{key[1]}" for key in keys}
    first_plan_asian_male = {seed for _, seed in plans[0].candidates[("asian", "male")]}
    first_candidates = {cands[0] for plan in plans for cands in plan.candidates.values()}

    def truth(file):
        prompt, seed = file.split("|")
        words = prompt.split()
        race, gender = words[5], words[6]
        key = (prompt, int(seed))
        if (race, gender) == ("white", "female") and key in first_candidates:
            gender = "male"
        if int(seed) in first_plan_asian_male:
            race = "black"
        return race, gender

    def classify_files(names):
        cells = [truth(f) for f in names]
        return {"gender": [_gender(g) for _, g in cells], "race": [_race(r) for r, _ in cells]}

    fetched = []

    def fetch_files(wanted):
        fetched.extend(wanted)
        return {key: files[key] for key in wanted}

    groups, stats = select_chosen(plans, fetch_files, classify_files, config, "requested")
    # candidates are sampled lazily: a second candidate only where the first disagreed (4 white-female cells and
    # group 0's asian man), the rest never
    later_candidates = {key for plan in plans for cands in plan.candidates.values() for key in cands[1:]}
    second = [key for key in fetched if key in later_candidates]
    assert len(second) == 4 + 1 and stats["candidates_classified"] == 24 + 5
    assert len(fetched) == len(set(fetched)) == 24 + 5 + 4 * 6  # every image fetched once, the rejected too
    assert stats["groups"] == 4 and stats["groups_dropped"] == 0
    # group 0 lost its asian-male cell; the white-female cells fell back to their second candidate
    assert [len(g.chosen) for g in groups] == [5, 6, 6, 6]
    assert ("asian", "male") not in groups[0].chosen_cells
    for group in groups:
        assert len(set(group.chosen_cells)) == len(group.chosen_cells)
        for file, cell in zip(group.chosen, group.chosen_cells):
            assert truth(file) == cell
        assert len(group.rejected) == 6
    assert stats["attribute_agreement_first_candidate"] == pytest.approx(1 - (4 + 1) / 24)

    # balancing genders drops the asian-female cell of group 0 too (its asian-male cell found no image)
    balanced, _ = select_chosen(plans, fetch_files, classify_files,
                                GroupsConfig(groups_per_occupation=2, candidates_per_cell=2, min_chosen=4,
                                             filter="attributes"), "requested")
    assert [len(g.chosen) for g in balanced] == [4, 6, 6, 6]
    assert sorted(balanced[0].chosen_cells) == [("black", "female"), ("black", "male"), ("white", "female"),
                                                ("white", "male")]

    pairs = pairs_from_groups(groups)
    assert len(pairs) == 5 + 6 + 6 + 6
    assert all(len(p.chosen) == len(p.rejected) == 1 for p in pairs)
    # the thesis' single-sample DPO: one (chosen i, rejected i) pair per group, a seeded draw
    single = pairs_from_groups(groups, per_group=1, seed=3)
    assert len(single) == len(groups) and [p.prompt for p in single] == [g.prompt for g in groups]
    for pair, group in zip(single, groups):
        i = group.chosen.index(pair.chosen[0])
        assert pair.rejected == [group.rejected[i]] and pair.chosen_cells == [group.chosen_cells[i]]
    assert [p.chosen for p in pairs_from_groups(groups, per_group=1, seed=3)] == [p.chosen for p in single]
    drawn = {tuple(p.chosen[0] for p in pairs_from_groups(groups, per_group=1, seed=s)) for s in range(8)}
    assert len(drawn) > 1  # the seed moves the draw
    # without filtering the first candidate of every cell is kept, agreeing or not
    unfiltered, _ = select_chosen(plans, fetch_files, classify_files,
                                  GroupsConfig(groups_per_occupation=2, filter="none", candidates_per_cell=2,
                                               balance_genders=False),
                                  "requested")
    assert [len(g.chosen) for g in unfiltered] == [6, 6, 6, 6]
    # filtering on one attribute: gender keeps group 0's asian man read as black (first candidate) and skips the
    # white women read as men; race does the opposite
    by_attribute = {}
    for attribute in ("gender", "race"):
        by_attribute[attribute], _ = select_chosen(
            plans, fetch_files, classify_files, GroupsConfig(groups_per_occupation=2, filter=attribute,
                                                       candidates_per_cell=2, balance_genders=False), "requested")
    assert [len(g.chosen) for g in by_attribute["gender"]] == [6, 6, 6, 6]
    assert [len(g.chosen) for g in by_attribute["race"]] == [5, 6, 6, 6]
    first_of = {cell: cands[0] for cell, cands in plans[0].candidates.items()}
    kept_by_gender = dict(zip(by_attribute["gender"][0].chosen_cells, by_attribute["gender"][0].chosen))
    kept_by_race = dict(zip(by_attribute["race"][0].chosen_cells, by_attribute["race"][0].chosen))
    assert kept_by_gender[("asian", "male")] == files[first_of[("asian", "male")]]
    assert kept_by_gender[("white", "female")] != files[first_of[("white", "female")]]
    assert kept_by_race[("white", "female")] == files[first_of[("white", "female")]]
    assert ("asian", "male") not in kept_by_race


def test_config_errors_are_clear():
    with pytest.raises((ValueError, ConfigError), match="races"):
        load_config(DebiasConfig, {"groups": {"races": ["white", "martian"]}})
    with pytest.raises((ValueError, ConfigError), match="unique"):
        load_config(DebiasConfig, {"methods": [{"name": "a", "objective": "dpo", "beta": 1.0},
                                               {"name": "a", "objective": "mdpo", "beta": 1.0}]})
    with pytest.raises((ValueError, ConfigError), match="method 'a'.*missing hyperparameter.*beta"):
        load_config(DebiasConfig, {"methods": [{"name": "a", "objective": "dpo"}]})
    with pytest.raises((ValueError, ConfigError), match="not both"):
        load_config(DebiasConfig, {"methods": [{"name": "a", "objective": "dpo", "beta": 1.0, "beta_d": 2.0}]})
    with pytest.raises((ValueError, ConfigError), match="method 'a'.*unknown objective 'dop'"):
        load_config(DebiasConfig, {"methods": [{"name": "a", "objective": "dop", "beta": 1.0}]})
    with pytest.raises((ValueError, ConfigError), match="method 'a'.*unknown hyperparameter.*'epsilon'"):
        load_config(DebiasConfig, {"methods": [{"name": "a", "objective": "rdpo", "beta": 1.0, "epsilon": 0.1}]})
    with pytest.raises(ConfigError, match="methods.*params: no longer accepted; write these keys directly"):
        load_config(DebiasConfig, {"methods": [{"name": "a", "objective": "rdpo", "beta": 1.0, "params": {"eps": 0.1}}]})
    with pytest.raises(ConfigError, match="threads: no longer accepted; use training.num_threads"):
        load_config(DebiasConfig, {"threads": 1})
    with pytest.raises(ConfigError, match="model.lora_rank: no longer accepted; use lora.r"):
        load_config(DebiasConfig, {"model": {"lora_rank": 4}})
    # sft needs no β (it only scales its logged rewards)
    assert load_config(DebiasConfig, {"methods": [{"name": "sft", "objective": "sft"}]}).methods[0].beta is None
    with pytest.raises((ValueError, ConfigError), match="pairs_per_group"):
        load_config(DebiasConfig, {"methods": [{"name": "a", "objective": "dpo", "beta": 1.0, "pairs_per_group": 1}]})
    with pytest.raises((ValueError, ConfigError), match="pairs_per_group"):
        load_config(DebiasConfig, {"methods": [{"name": "a", "objective": "dpo", "beta": 1.0, "pairs": True,
                                                "pairs_per_group": 0}]})


# ------------------------------------------------------------------------------------------------ metrics
def test_diversity_stats_on_hand_made_predictions():
    genders = [_gender("male")] * 3 + [_gender("female", confidence=0.6)]
    races = [_race("white"), _race("white"), _race("black", face_found=False), _race("asian", confidence=0.5)]
    stats = diversity_stats(genders, races, ["male", "female"], ["black", "white", "asian"], "requested")
    assert stats["simpson_gender"] == pytest.approx(1 - (0.75 ** 2 + 0.25 ** 2))
    assert stats["gender_gap"] == pytest.approx(0.5)
    # race: white 2, black 1 (no face, still scored from its probabilities), asian 1
    assert stats["race_counts"] == {"black": 1, "white": 2, "asian": 1}
    assert stats["simpson_race"] == pytest.approx(1 - (0.5 ** 2 + 2 * 0.25 ** 2))
    assert stats["race_gap"] == pytest.approx((0.25 + 0.25 + 0.0) / 3)
    assert stats["no_face_rate"] == pytest.approx(0.25)
    assert stats["low_confidence_gender"] == pytest.approx(0.25)
    assert stats["low_confidence_race"] == pytest.approx(0.5)  # the no-face one and the 0.5 one
    faces_only = diversity_stats(genders, races, ["male", "female"], ["black", "white", "asian"], "requested",
                                 faces_only=True)
    assert faces_only["n_scored"] == 3 and faces_only["race_counts"] == {"black": 0, "white": 2, "asian": 1}
    everything = diversity_stats(genders, races, ["male", "female"], ["black", "white", "asian"], "all")
    assert set(everything["race_counts"]) == {"white", "black", "asian", "other"}
    summary = average_stats({"a": stats, "b": {**stats, "simpson_gender": 0.0}})
    assert summary["simpson_gender"] == pytest.approx(stats["simpson_gender"] / 2)


def test_heldout_denoising_error_equals_a_direct_computation(tiny_pixel_path):
    from mmalign.image.conditioning import split_conditioning
    from mmalign_experiments.debias.measure import heldout_denoising_error
    from mmalign.image.models import load_diffusion_components

    parts = load_diffusion_components(str(tiny_pixel_path))
    rng = np.random.default_rng(0)
    size = parts.unet.config.sample_size
    images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    prompts = ["a", "b", "c"]
    value = heldout_denoising_error(parts.unet, parts.noise_scheduler, parts.conditioner, images, prompts, draws=2,
                                    seed=5)
    generator = torch.Generator().manual_seed(5)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    states, mask = split_conditioning(parts.conditioner(prompts))
    errors = []
    with torch.no_grad():
        for _ in range(2):
            noise = torch.randn(x.shape, generator=generator)
            t = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (3,), generator=generator)
            noisy = parts.noise_scheduler.add_noise(x, noise, t)
            prediction = parts.unet(noisy, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
            errors.append(((prediction - noise) ** 2).mean(dim=(1, 2, 3)))
    assert value == pytest.approx(torch.cat(errors).mean().item(), rel=1e-5)
    # same seed, same number: the drift comparison between models is paired
    assert heldout_denoising_error(parts.unet, parts.noise_scheduler, parts.conditioner, images, prompts, draws=2,
                                   seed=5) == value


# ------------------------------------------------------------------------------------------------ end to end
def test_debias_command_end_to_end_on_the_shipped_model(tmp_path):
    from mmalign_experiments.debias.cli import main

    out = tmp_path / "run"
    report = main([
        "--set", f"output_dir={out}", "--set", f"cache_dir={tmp_path / 'cache'}",
        "--set", "occupations.count=6", "--set", "occupations.eval_fraction=0.34",
        "--set", "groups.candidates_per_cell=1", "--set", "groups.rejected_per_group=3", "--set", "groups.min_chosen=1",
        "--set", "groups.filter=none",
        "--set", "sampling.num_inference_steps=2", "--set", "evaluation.images_per_occupation=3",
        "--set", "evaluation.quality_images=4", "--set", "evaluation.quality_noise_draws=1",
        "--set", "training.max_steps=1", "--set", "training.batch_size=2", "--set", "training.progress_bar=false",
        "--set", "methods=[{name: mdpo, objective: mdpo, beta_d: 2000}, {name: dpo, objective: dpo, beta_d: 2000, "
                 "pairs: true, pairs_per_group: 1}, {name: dpo_all, objective: dpo, beta_d: 2000, pairs: true}, "
                 "{name: sft, objective: sft}]",
    ])
    for name in ("report.json", "report.md", "gender_bars.png", "race_bars.png", "before_after.png", "config.yaml",
                 "data/groups.jsonl", "data/pairs.jsonl", "data/pairs-1-per-group.jsonl"):
        assert (out / name).is_file(), name
    groups_written = (out / "data/groups.jsonl").read_text().splitlines()
    assert len((out / "data/pairs-1-per-group.jsonl").read_text().splitlines()) == len(groups_written)
    written = json.loads((out / "report.json").read_text())
    assert set(written["summary"]) == {"base", "mdpo", "dpo", "dpo_all", "sft"}
    batch_sizes = {m: yaml.safe_load((out / "methods" / m / "config.yaml").read_text())["training"]["batch_size"]
                   for m in ("mdpo", "dpo", "dpo_all")}
    assert batch_sizes == {"mdpo": 2, "dpo": 2, "dpo_all": 2 * 3}  # k = rejected_per_group = 3
    held_out = {o["occupation"] for o in written["occupations"]["eval"]}
    assert len(held_out) == 2
    trained_on = {json.loads(line)["occupation"] for line in (out / "data/groups.jsonl").read_text().splitlines()}
    assert trained_on and not trained_on & held_out
    for summary in written["summary"].values():
        assert 0 <= summary["simpson_gender"] <= 0.5 and 0 <= summary["simpson_race"] <= 2 / 3
        assert summary["denoising_loss"] > 0
    assert "| mdpo |" in (out / "report.md").read_text()
    assert report["groups"]["groups"] >= 1
    assert written["training"]["mdpo"]["step"] == written["training"]["dpo"]["step"] == 1  # the configured steps
    # the second run finds every training image in the cache
    cache_files = sorted(p for p in (tmp_path / "cache").rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in cache_files]
    main(["--set", f"output_dir={tmp_path / 'run2'}", "--set", f"cache_dir={tmp_path / 'cache'}",
          "--set", "occupations.count=6", "--set", "occupations.eval_fraction=0.34",
          "--set", "groups.candidates_per_cell=1", "--set", "groups.rejected_per_group=3",
          "--set", "groups.min_chosen=1", "--set", "groups.filter=none", "--set", "sampling.num_inference_steps=2",
          "--set", "evaluation.images_per_occupation=3", "--set", "evaluation.quality_images=0",
          "--set", "training.max_steps=1", "--set", "training.progress_bar=false",
          "--set", "methods=[{name: mdpo, objective: mdpo, beta_d: 2000}]"])
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").rglob("*.png"))] == mtimes


def test_debias_cli_help_lists_the_options(capsys):
    from mmalign_experiments.debias.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("groups.balance_genders", "classifier.race_scoring", "evaluation.images_per_occupation",
                   "debias-sd15.yaml"):
        assert option in text


def test_shipped_sd15_recipe_validates():
    config = load_config(DebiasConfig, Path(__file__).resolve().parents[2] / "configs/image/debias-sd15.yaml")
    assert [(m.name, m.pairs, m.pairs_per_group) for m in config.methods if m.objective == "dpo"] == [
        ("dpo", True, 1), ("dpo_all_pairs", True, None)]


def test_sd15_recipe_runs_end_to_end_on_a_tiny_sd_layout_pipeline(tmp_path, tiny_sd_path, monkeypatch):
    """The recipe's own code path (latent UNet + VAE + CLIP, LoRA with the adapter-disabled base as reference,
    cached latents, gradient checkpointing, DPM-Solver, every method it lists) on a tiny SD-1.x-layout pipeline.
    Only what cannot run here is overridden: the weights, deepface (no weights offline; the tiny model draws no
    faces, so no filter), fp16 (CPU) and the scale."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    from mmalign.image import data as image_data
    from mmalign_experiments.debias.cli import main

    calls = {"dpm_solver": 0, "checkpointing": 0, "latent_cache": 0}

    def counting(key, original):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(DPMSolverMultistepScheduler, "set_timesteps",
                        counting("dpm_solver", DPMSolverMultistepScheduler.set_timesteps))
    monkeypatch.setattr(UNet2DConditionModel, "enable_gradient_checkpointing",
                        counting("checkpointing", UNet2DConditionModel.enable_gradient_checkpointing))
    monkeypatch.setattr(image_data.LatentCache, "__init__", counting("latent_cache", image_data.LatentCache.__init__))

    recipe = Path(__file__).resolve().parents[2] / "configs/image/debias-sd15.yaml"
    out = tmp_path / "run"
    main(["--config", str(recipe), "--set", f"output_dir={out}", "--set", f"cache_dir={tmp_path / 'cache'}",
          "--set", f"model.name_or_path={tiny_sd_path}", "--set", "model.dtype=float32",
          "--set", "training.mixed_precision=no", "--set", "classifier.name=default", "--set", "classifier.kwargs={}",
          "--set", "groups.filter=none", "--set", "groups.groups_per_occupation=1",
          "--set", "groups.candidates_per_cell=1", "--set", "groups.rejected_per_group=3",
          "--set", "occupations.count=6", "--set", "occupations.eval_fraction=0.34",
          "--set", "sampling.num_inference_steps=2", "--set", "sampling.batch_size=4",
          "--set", "evaluation.images_per_occupation=3", "--set", "evaluation.quality_images=4",
          "--set", "evaluation.quality_noise_draws=1", "--set", "evaluation.grid_images=2",
          "--set", "training.max_steps=2", "--set", "training.warmup_steps=0",
          "--set", "training.gradient_accumulation_steps=1", "--set", "training.save_steps=0",
          "--set", "training.progress_bar=false"])
    written = json.loads((out / "report.json").read_text())
    assert set(written["summary"]) == {"base", "mdpo", "dpo", "dpo_all_pairs", "mipo"}
    for method in ("mdpo", "dpo", "dpo_all_pairs", "mipo"):
        assert written["training"][method]["step"] == 2
        # LoRA: only the adapter is saved, the base stays the reference
        assert (out / "methods" / method / "final" / "pytorch_lora_weights.safetensors").is_file()
        assert not (out / "methods" / method / "final" / "unet").exists()
    for name in ("report.md", "gender_bars.png", "race_bars.png", "before_after.png"):
        assert (out / name).is_file(), name
    # the recipe's sampler, memory savers and latent cache were used, once per trained method at least
    assert calls["dpm_solver"] >= 5 and calls["checkpointing"] >= 4 and calls["latent_cache"] >= 4, calls
