"""Summaries of the GPU bench's case entries: medians over rounds, MFU, ratios against the peers measured in the same
run, the issue's goals (checked, whatever the direction), and the short table printed last."""
from __future__ import annotations

from gpu_common import finite, median

NAN = float("nan")


def _ok(entries, section):
    return [e for e in entries if e.get("section") == section and e.get("status") == "ok"]


def _matmul_tflops(entries) -> float:
    for e in _ok(entries, "device"):
        if e["case"] == "matmul":
            return e["tflops"]
    return NAN


def text_summary(entries) -> list[dict]:
    peak_rate = _matmul_tflops(entries)
    groups: dict[tuple, list[dict]] = {}
    for e in _ok(entries, "text"):
        groups.setdefault((e["objective"], e["finetuning"], e["seq_len"], e["impl"]), []).append(e)
    rows = []
    for (objective, mode, seq_len, impl), runs in groups.items():
        step = median([t for r in runs for t in r["step_times_s"]])
        flops = runs[0]["model_flops_per_step"]
        rows.append({"objective": objective, "finetuning": mode, "seq_len": seq_len, "impl": impl, "runs": len(runs),
                     "median_step_s": step, "tokens_per_step": runs[0]["tokens_per_step"],
                     "tokens_per_s": runs[0]["tokens_per_step"] / step,
                     "peak_memory_mib": median([r["peak_memory_mib"] for r in runs]),
                     "mfu": flops / step / (peak_rate * 1e12) if finite(peak_rate) else NAN})
    by_key = {(r["objective"], r["finetuning"], r["seq_len"], r["impl"]): r for r in rows}
    for r in rows:
        for peer in ("trl", "bare"):
            other = by_key.get((r["objective"], r["finetuning"], r["seq_len"], peer))
            # > 1: this implementation's step is faster than the peer's
            r[f"speed_vs_{peer}"] = other["median_step_s"] / r["median_step_s"] if other else NAN
            r[f"memory_vs_{peer}"] = r["peak_memory_mib"] / other["peak_memory_mib"] if other else NAN
    return sorted(rows, key=lambda r: (r["seq_len"], r["finetuning"], r["objective"], r["impl"]))


def image_summary(entries) -> list[dict]:
    memory = {(e["attention"], e["gradient_checkpointing"], e["variant"]): e["peak_memory_mib"]
              for e in _ok(entries, "image") if e["kind"] == "memory"}
    rows = []
    for e in _ok(entries, "image"):
        if e["kind"] != "time":
            continue
        for variant, v in e["variants"].items():
            rows.append({"attention": e["attention"], "gradient_checkpointing": e["gradient_checkpointing"],
                         "variant": variant, "median_step_s": v["median_step_s"], "images_per_s": v["images_per_s"],
                         "images_per_step": v["images_per_step"], "rounds": len(v["step_times_s"]),
                         "peak_memory_mib": memory.get((e["attention"], e["gradient_checkpointing"], variant), NAN)})
    for key, value in memory.items():  # memory measured, timing pass lost: still report it
        if not any((r["attention"], r["gradient_checkpointing"], r["variant"]) == key for r in rows):
            rows.append({"attention": key[0], "gradient_checkpointing": key[1], "variant": key[2],
                         "median_step_s": NAN, "images_per_s": NAN, "peak_memory_mib": value})
    return rows


def goals(text_rows, image_rows) -> list[dict]:
    """The issue's goals on the H200, each with the measured value (NaN when its cases did not run)."""
    def text(objective, mode, seq_len, impl="mmalign"):
        return next((r for r in text_rows if (r["objective"], r["finetuning"], r["seq_len"], r["impl"]) ==
                     (objective, mode, seq_len, impl)), {})

    def image(variant, attention="sdpa", checkpointing=False):
        return next((r for r in image_rows if (r["variant"], r["attention"], r["gradient_checkpointing"]) ==
                     (variant, attention, checkpointing)), {})

    seq_lens = sorted({r["seq_len"] for r in text_rows}) or [NAN]
    longest = seq_lens[-1]
    out = []
    for seq_len in seq_lens:
        out.append({"goal": f"mmalign DPO LoRA step >= 1.5x TRL's (L={seq_len})", "target": 1.5, "direction": ">=",
                    "value": text("dpo", "lora", seq_len).get("speed_vs_trl", NAN)})
    out.append({"goal": f"MFU >= 40% with full fine-tuning at L={longest} (mmalign DPO)", "target": 0.40,
                "direction": ">=", "value": text("dpo", "full", longest).get("mfu", NAN)})
    two_unet, ours = image("naive_full"), image("mmalign_lora")
    out.append({"goal": "Diffusion-DPO LoRA step >= 1.2x the two-UNet loop (SDPA, no checkpointing)", "target": 1.2,
                "direction": ">=", "value": two_unet.get("median_step_s", NAN) / ours.get("median_step_s", NAN)
                if ours else NAN})
    out.append({"goal": "Diffusion-DPO LoRA peak memory <= 0.7x the two-UNet loop's", "target": 0.7, "direction": "<=",
                "value": ours.get("peak_memory_mib", NAN) / two_unet.get("peak_memory_mib", NAN) if two_unet else NAN})
    for g in out:
        v = g["value"]
        g["met"] = (v >= g["target"] if g["direction"] == ">=" else v <= g["target"]) if finite(v) else None
    return out


def summarise(entries) -> dict:
    text_rows, image_rows = text_summary(entries), image_summary(entries)
    return {"text_summary": text_rows, "image_summary": image_rows, "goals": goals(text_rows, image_rows),
            "matmul_tflops": _matmul_tflops(entries),
            "errors": [{k: e.get(k) for k in ("section", "case", "error")} for e in entries if e.get("status") == "error"]
            + [{"section": e["section"], "case": f"{e['case']}/{variant}", "error": error}  # one variant of a timing pass
               for e in entries if e.get("status") == "ok" for variant, error in e.get("failed_variants", {}).items()],
            "skipped": [{k: e.get(k) for k in ("section", "case", "reason")} for e in entries if e.get("status") == "skipped"]}


def _f(value, fmt):
    return format(value, fmt) if finite(value) else "-"


def table(data: dict) -> str:
    lines = []
    info = next((e for e in data["entries"] if e.get("case") == "info" and e.get("status") == "ok"), {})
    lines.append(f"device: {info.get('name', '?')}, torch {info.get('torch', '?')}; measured matmul "
                 f"{_f(data.get('matmul_tflops'), '.3g')} TFLOP/s; dry run: {data['meta']['dry_run']}")
    lines.append(f"TEXT  setting            {'impl':27s} s/step   tok/s    peak GiB  MFU    vs TRL  vs bare")
    for r in data.get("text_summary", []):
        setting = f"{r['objective']}/{r['finetuning']}/L{r['seq_len']}"
        lines.append(f"      {setting:18s} {r['impl']:27s} {_f(r['median_step_s'], '7.3f')} {_f(r['tokens_per_s'], '8.0f')} "
                     f"{_f(r['peak_memory_mib'] / 1024, '8.2f')}  {_f(100 * r['mfu'], '5.1f')}% "
                     f"{_f(r['speed_vs_trl'], '6.2f')}x {_f(r['speed_vs_bare'], '6.2f')}x")
    lines.append("IMAGE pass           variant            s/step  img/s   peak GiB")
    for r in data.get("image_summary", []):
        tag = f"{r['attention']}/gc-{'on' if r['gradient_checkpointing'] else 'off'}"
        lines.append(f"      {tag:14s} {r['variant']:18s} {_f(r['median_step_s'], '6.3f')} {_f(r['images_per_s'], '6.1f')} "
                     f"{_f(r['peak_memory_mib'] / 1024, '8.2f')}")
    suite = data["sections"].get("suite", {})
    for run in suite.get("runs", []):
        lines.append(f"SUITE pytest {' '.join(run['args'])[:60]}: {run['status']}, {run.get('summary_line') or '-'}")
    if "reason" in suite:
        lines.append(f"SUITE {suite['status']}: {suite['reason']}")
    for g in data.get("goals", []):
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        lines.append(f"GOAL  {g['goal']}: {_f(g['value'], '.2f')} ({verdict})")
    lines.append(f"errors: {len(data.get('errors', []))}, skipped: {len(data.get('skipped', []))} (details in the JSON)")
    return "\n".join(lines)
