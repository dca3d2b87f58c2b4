"""The chain's report: what each SnapFusion stage bought on the world, against the paper.

:func:`write_report` reads what ``snapjax world`` left in its workdir (``chain.json``, the
evaluation's ``eval/eval.json``, evolution's ``evolve/evolve.json``, the export reports) and
writes ``REPORT.md`` and ``report.json``:

* the headroom check: the 50-step teacher clearly short of perfect on the all-attributes rate,
  and clearly worse at the students' step count (else no comparison below means anything);
* one row per paper claim: the claim, the world's numbers, and holds / holds on one metric
  only / does not hold / not measured, by a rule stated in the row (intervals are 95%:
  bootstrap over the pooled images for accuracies, the t interval over seeds for the Fréchet
  distance);
* one row per model (params, GFLOPs and CPU latency per image, UNet calls, quality) at its
  best-accuracy guidance of the sweep, with its lowest Fréchet distance beside, and the whole
  sweep;
* the stage times, the export's parity numbers, the grids and the curves.

Quality comparisons take each metric at each model's own best guidance of the sweep (the
highest all-attributes rate; the lowest Fréchet distance): the paper compares models along
their guidance curves, and a distilled student wants less guidance than its teacher
(docs/distill.md). A claim can then hold on one metric and not the other, and says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Mapping

from etils import epath

from snapjax import storage

ALL, MEAN, FD = "accuracy/all", "accuracy/mean", "frechet_distance"
# Headroom: the 50-step teacher's all-attributes interval must end this far below perfect.
HEADROOM_MARGIN = 0.02
HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured"
PARTLY = ("holds on accuracy only", "holds on Fréchet only")


@dataclasses.dataclass(frozen=True)
class Claim:
    id: str
    paper: str       # what the paper states
    rule: str        # how the world's numbers decide it


def best(results: Mapping, model: str, steps: int, metric: str = ALL) -> dict | None:
    """The sweep's setting of ``model`` at ``steps`` best on ``metric`` (the highest
    all-attributes rate, ties: the lower Fréchet distance; or the lowest Fréchet distance, ties:
    the higher rate), or None if it was not evaluated."""
    rows = [r for r in results.get(model, {}).get("settings", []) if r["steps"] == steps]
    if not rows:
        return None
    if metric == FD:
        return min(rows, key=lambda r: (r["metrics"][FD]["value"], -r["metrics"][ALL]["value"]))
    return max(rows, key=lambda r: (r["metrics"][ALL]["value"], -r["metrics"][FD]["value"]))


def side(results: Mapping, model: str, steps: int) -> dict | None:
    """{metric: the sweep's best row on it}: each metric at its own best guidance."""
    rows = {m: best(results, model, steps, m) for m in (ALL, FD)}
    return rows if rows[ALL] is not None else None


def _iv(row: dict, key: str, digits: int = 3) -> str:
    m = row["metrics"][key]
    f = f"{{:.{digits}f}}"
    return f"{f.format(m['value'])} [{f.format(m['low'])}, {f.format(m['high'])}]"


def _quality(s: dict) -> str:
    return (f"all {_iv(s[ALL], ALL)} (w {s[ALL]['guidance']:g}), Fréchet {_iv(s[FD], FD, 1)} "
            f"(w {s[FD]['guidance']:g}), {s[ALL]['steps']} steps")


def matches_on(a: dict, b: dict, metric: str) -> bool:
    """``a`` matches or beats ``b`` on ``metric`` (each at its best guidance): its value at
    least ``b``'s lower bound (accuracy) or at most ``b``'s upper bound (Fréchet)."""
    if metric == FD:
        return a[FD]["metrics"][FD]["value"] <= b[FD]["metrics"][FD]["high"]
    return a[ALL]["metrics"][ALL]["value"] >= b[ALL]["metrics"][ALL]["low"]


def better_on(a: dict, b: dict, metric: str) -> bool:
    """``a`` is clearly better than ``b`` on ``metric``: the two intervals apart."""
    if metric == FD:
        return a[FD]["metrics"][FD]["high"] < b[FD]["metrics"][FD]["low"]
    return a[ALL]["metrics"][ALL]["low"] > b[ALL]["metrics"][ALL]["high"]


def verdict_of(ok: Mapping[str, bool]) -> str:
    """holds on both metrics, on one ("holds on Fréchet only"), or on neither."""
    if all(ok.values()):
        return HOLDS
    if not any(ok.values()):
        return FAILS
    return PARTLY[0] if ok[ALL] else PARTLY[1]


def judge(kind: str, a: dict, b: dict) -> str:
    test = matches_on if kind == "matches" else better_on
    return verdict_of({m: test(a, b, m) for m in (ALL, FD)})


def headroom(results: Mapping, reference_steps: int, few_steps: int) -> dict:
    """Whether the teacher leaves room: at ``reference_steps`` clearly short of perfect on the
    all-attributes rate, and at ``few_steps`` clearly worse, per metric."""
    ref, few = side(results, "teacher", reference_steps), side(results, "teacher", few_steps)
    if ref is None or few is None:
        return {"holds": False, "verdict": NOT_MEASURED,
                "why": "the teacher was not evaluated at both step counts"}
    short = ref[ALL]["metrics"][ALL]["high"] < 1.0 - HEADROOM_MARGIN
    worse = {m: better_on(ref, few, m) for m in (ALL, FD)}
    if short and all(worse.values()):
        verdict = "yes"
    elif short and any(worse.values()):
        verdict = ("only on " + ("accuracy" if worse[ALL] else "the Fréchet distance"))
    else:
        verdict = "no"
    return {"holds": verdict == "yes", "verdict": verdict, "short_of_perfect": bool(short),
            "few_steps_clearly_worse": {"accuracy": bool(worse[ALL]),
                                        "frechet": bool(worse[FD])},
            "reference": _quality(ref), "few_steps": _quality(few),
            "rule": (f"the {reference_steps}-step teacher's all-attributes interval ends below "
                     f"{1 - HEADROOM_MARGIN:.2f}, and at {few_steps} steps it is clearly worse "
                     f"(intervals apart) on each metric, each at its best guidance"),
            "reference_steps": reference_steps, "few_steps_count": few_steps}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


BOTH = ("on both metrics, each at its best guidance of the sweep; one of the two is reported "
        "as \"holds on ... only\"")


def _claims(results: Mapping, ctx: dict) -> list[dict]:
    ref_steps, few = ctx["reference_steps"], ctx["few_steps"]
    teacher_ref, teacher_few = side(results, "teacher", ref_steps), side(results, "teacher", few)
    evolved_ref = side(results, "evolved", ref_steps)
    student, final = side(results, "student", few), side(results, "final", few)
    evolve = ctx.get("evolve") or {}
    out = []

    def add(claim: Claim, verdict: str, numbers: str) -> None:
        out.append({**dataclasses.asdict(claim), "verdict": verdict, "world": numbers})

    def need(*rows) -> bool:
        return all(r is not None for r in rows)

    c = Claim("evolution_cost", "Evolution removes blocks until the UNet meets the latency "
              "target (SnapFusion's UNet: 848 M params, 230 ms vs 1.7 s per step on a phone)",
              "holds if the evolved UNet's cost (batch-1 GFLOP, the world's latency table) is at "
              "most the target")
    if evolve:
        ok = evolve["final_latency"] <= evolve["target_latency"] * (1 + 1e-6)
        add(c, HOLDS if ok else FAILS,
            f"{evolve['start_blocks']} -> {evolve['blocks']} blocks, {evolve['start_latency']:.4g}"
            f" -> {evolve['final_latency']:.4g} {evolve['unit']} per UNet call "
            f"({evolve['latency_ratio']:.1%} of the teacher's; target "
            f"{evolve['target_latency'] / evolve['start_latency']:.0%})")
    else:
        add(c, NOT_MEASURED, "no evolve/evolve.json")

    c = Claim("evolution_quality", "The evolved UNet keeps the teacher's quality",
              f"holds if the evolved UNet at {ref_steps} steps matches the teacher at "
              f"{ref_steps} (its value within or beyond the teacher's interval) {BOTH}")
    if need(evolved_ref, teacher_ref):
        add(c, judge("matches", evolved_ref, teacher_ref),
            f"evolved {_quality(evolved_ref)}; teacher {_quality(teacher_ref)}")
    else:
        add(c, NOT_MEASURED, f"not evaluated at {ref_steps} steps")

    c = Claim("decoder_size", "Halving every decoder width gives 3.8x fewer parameters and "
              "3.2x lower latency (phone)",
              "holds if the pruned decoder has at least 3x fewer parameters; its GFLOP ratio "
              "is given beside (latency on a phone is not measured here)")
    if need(student, final):
        p = _ratio(results["student"]["params"]["vae_decoder"],
                   results["final"]["params"]["vae_decoder"])
        g = _ratio(results["student"]["gflop_per_call"]["vae_decoder"],
                   results["final"]["gflop_per_call"]["vae_decoder"])
        add(c, HOLDS if p >= 3 else FAILS,
            f"{results['student']['params']['vae_decoder']:,} -> "
            f"{results['final']['params']['vae_decoder']:,} params ({p:.2f}x fewer), "
            f"{g:.2f}x fewer GFLOP per decode")
    else:
        add(c, NOT_MEASURED, "the student or final model was not evaluated")

    c = Claim("decoder_quality", "The pruned decoder's images are similar to the original "
              "decoder's", "holds if the final model (pruned decoder) matches the same student "
              f"with the teacher's decoder {BOTH}")
    if need(student, final):
        psnr = ctx.get("decoder_psnr")
        extra = f"; decoder stage's held-out PSNR vs the teacher decoder {psnr:.1f} dB" \
            if psnr is not None else ""
        add(c, judge("matches", final, student),
            f"pruned {_quality(final)}; original {_quality(student)}{extra}")
    else:
        add(c, NOT_MEASURED, "the student or final model was not evaluated")

    c = Claim("distill_beats_teacher", "A step-distilled student samples better than its "
              "teacher at the student's step count",
              f"holds if the {few}-step student is clearly better (intervals apart) than the "
              f"teacher at {few} steps {BOTH}")
    if need(student, teacher_few):
        add(c, judge("better", student, teacher_few),
            f"student {_quality(student)}; teacher {_quality(teacher_few)}")
    else:
        add(c, NOT_MEASURED, f"not evaluated at {few} steps")

    c = Claim("headline_quality", "The 8-step SnapFusion model matches or beats 50-step "
              "SD-v1.5 (FID and CLIP over the guidance sweep)",
              f"holds if the final model at {few} steps (the world's 8) matches the teacher at "
              f"{ref_steps} {BOTH}")
    if need(final, teacher_ref):
        add(c, judge("matches", final, teacher_ref),
            f"final {_quality(final)}; teacher {_quality(teacher_ref)}")
    else:
        add(c, NOT_MEASURED, "the final model or the reference teacher was not evaluated")

    # Costs at each model's operating point: its best-accuracy guidance.
    fin, ref = (final or {}).get(ALL), (teacher_ref or {}).get(ALL)
    c = Claim("headline_flops", "...at a small fraction of its compute (8 steps of a cheaper "
              "UNet and a pruned decoder)", "holds if the final model's GFLOP per image is at "
              f"most 1/10 of the {ref_steps}-step teacher's (each at its best-accuracy guidance)")
    if need(fin, ref):
        r = _ratio(fin["gflop"], ref["gflop"])
        add(c, HOLDS if r <= 0.1 else FAILS,
            f"{fin['gflop']:.4g} vs {ref['gflop']:.4g} GFLOP per image = {r:.3f} "
            f"(1/{1 / r:.0f}); UNet calls {fin['unet_calls']} vs {ref['unet_calls']}")
    else:
        add(c, NOT_MEASURED, "the final model or the reference teacher was not evaluated")

    c = Claim("headline_latency", "...and runs far faster: 1.96 s vs about 85 s per image on "
              "an iPhone 14 Pro (43x)", "holds if the final model is at least 10x faster per "
              "image than the teacher, measured here (batch 1, same run, each at its "
              "best-accuracy guidance)")
    if need(fin, ref) and "latency_s" in fin and "latency_s" in ref:
        r = _ratio(ref["latency_s"], fin["latency_s"])
        add(c, HOLDS if r >= 10 else FAILS,
            f"{fin['latency_s'] * 1e3:.1f} vs {ref['latency_s'] * 1e3:.1f} ms per "
            f"image = {r:.1f}x faster ({ctx.get('device', 'this backend')})")
    else:
        add(c, NOT_MEASURED, "latency was not measured (eval.latency=False)")

    for claim_id, paper, page in ABLATION_CLAIMS:
        found = ctx.get("ablations", {}).get(claim_id)
        if found is None:
            add(Claim(claim_id, paper, "an ablation: snapjax world --stages ablations,report"),
                NOT_MEASURED, f"not run by this chain; earlier measurements: {page}")
        else:
            rule, verdict, numbers = found
            add(Claim(claim_id, paper, rule), verdict, numbers)
    return out


ABLATION_CLAIMS = (
    ("robust_vs_plain", "After robust training, removing blocks still gives good images; "
     "removing them from plain SD-v1.5 breaks it", "docs/evolution.md"),
    ("evolution_vs_naive", "Evolution's choice of blocks beats removing them naively",
     "docs/evolution.md"),
    ("decoder_init_and_data", "The pruned decoder trains from the teacher's weights on "
     "generated latents (no image data)", "docs/decoder.md"),
    ("direct_vs_progressive", "Direct distillation beats progressive", "docs/distill.md"),
    ("cfg_aware_loss", "Vanilla distillation gives the lowest FID, the CFG-aware loss the "
     "highest CLIP, the mix both", "docs/distill.md"),
    ("original_loss_gamma", "The original denoising loss (gamma) lowers FID at no CLIP cost",
     "docs/distill.md"),
    ("guidance_conditioned", "A guidance-conditioned student saturates below the two-call "
     "SnapFusion student", "docs/distill.md"))
# Which ablation (WORKDIR/ablations/<name>) decides which claim.
ABLATION_OF_CLAIM = {"decoder_init_and_data": "decoder_init"}


def _ablation_verdicts(workdir: epath.Path, results: Mapping, ctx: dict) -> dict:
    """claim id -> (rule, verdict, numbers) for every ablation that ran; ``results`` gets the
    ablations' evaluated models (the same prompts, seeds and sweep as the chain's)."""
    root = workdir / "ablations"
    out = {}
    merged = dict(results)
    for claim_id, _, _ in ABLATION_CLAIMS:
        name = ABLATION_OF_CLAIM.get(claim_id, claim_id)
        if not (root / name / "result.json").is_file():
            continue
        ev = _read_json(root / name / "eval.json")
        if ev:
            merged.update(ev["models"])
        out[claim_id] = None
    few, ref = ctx["few_steps"], ctx["reference_steps"]
    half = few * 2

    def q(model, steps):
        found = side(merged, model, steps)
        return found, (_quality(found) if found else "not evaluated")

    def judged(kind, a, b):
        return judge(kind, a, b) if a and b else NOT_MEASURED

    if "direct_vs_progressive" in out:
        d, dq = q("student", few)
        p, pq = q("progressive", few)
        out["direct_vs_progressive"] = (
            f"holds if the direct {few}-step student (evolved UNet) is clearly better than the "
            f"progressive one (teacher's UNet) {BOTH}", judged("better", d, p),
            f"direct {dq}; progressive {pq}")
    if "cfg_aware_loss" in out:
        ex = {m: side(merged, m, few) for m in ("vanilla", "student", "cfg_aware")}
        if all(ex.values()):
            lowest_fd = min(ex, key=lambda m: ex[m][FD]["metrics"][FD]["value"])
            highest_all = max(ex, key=lambda m: ex[m][ALL]["metrics"][ALL]["value"])
            nums = "; ".join(f"{m if m != 'student' else 'mix (p = 0.1)'}: {_quality(ex[m])}"
                             for m in ex)
            verdict = HOLDS if (lowest_fd, highest_all) == ("vanilla", "cfg_aware") else FAILS
        else:
            nums, verdict = "not every variant was evaluated", NOT_MEASURED
        out["cfg_aware_loss"] = (
            "over the guidance sweep: holds if vanilla (p = 0) reaches the lowest Fréchet "
            "distance and CFG-aware only (p = 1) the highest all-attributes rate of the three",
            verdict, nums)
    if "original_loss_gamma" in out:
        s_, sq = q("student", few)
        g, gq = q("gamma0", few)
        if s_ and g:
            verdict = verdict_of({FD: better_on(s_, g, FD), ALL: matches_on(s_, g, ALL)})
        else:
            verdict = NOT_MEASURED
        out["original_loss_gamma"] = (
            "holds if gamma = 0.2 gives a clearly lower Fréchet distance than gamma = 0 "
            "(intervals apart) and matches its all-attributes rate, each at its best guidance",
            verdict, f"gamma 0.2 {sq}; gamma 0 {gq}")
    if "guidance_conditioned" in out:
        s_, sq = q("student", few)
        g, gq = q("guided", half)
        out["guidance_conditioned"] = (
            f"holds if the two-call {few}-step student is clearly better than the "
            f"guidance-conditioned {half}-step one (the same {2 * few} UNet calls per image) "
            f"{BOTH}", judged("better", s_, g),
            f"two-call {sq}; guidance-conditioned {gq}")
    if "decoder_init_and_data" in out:
        f_, fq = q("final", few)
        r, rq = q("final_random_decoder", few)
        psnr_t = ctx.get("decoder_psnr")
        psnr_r = (_read_json(root / "decoder_random" / "metrics.json") or {}).get("eval/psnr")
        ok = (f_ and r and psnr_t is not None and psnr_r is not None and psnr_t > psnr_r
              and judge("matches", f_, r) == HOLDS)
        ps = (f"held-out PSNR {psnr_t:.1f} vs {psnr_r:.1f} dB; "
              if psnr_t is not None and psnr_r is not None else "")
        out["decoder_init_and_data"] = (
            "holds if the teacher-initialised decoder has the higher held-out PSNR and its "
            "final model matches or beats the random-init one on both metrics (the data half, "
            "real-image latents, is not run by the chain: docs/decoder.md)", HOLDS if ok else FAILS,
            f"{ps}teacher init {fq}; random init {rq}")
    if "robust_vs_plain" in out:
        scores = _read_json(root / "robust_vs_plain" / "block_scores.json") or {}
        drops = {m: [v[0] for v in s["drop"].values() if v] for m, s in scores.items()}
        if drops.get("plain") and drops.get("robust"):
            mean = {m: sum(v) / len(v) for m, v in drops.items()}
            key = scores["robust"]["key"]
            nums = "; ".join(f"{m}: full {scores[m]['full'][key][0]:.3f}, mean drop "
                             f"{mean[m]:.3f}, worst {max(drops[m]):.3f} over {len(drops[m])} "
                             f"blocks" for m in ("plain", "robust"))
            verdict = HOLDS if mean["robust"] < mean["plain"] else FAILS
            nums += (f" ({key}, {scores['robust']['num_prompts']} prompts, "
                     f"{scores['robust']['num_steps']} steps, one seed)")
        else:
            nums, verdict = "no block scores", NOT_MEASURED
        out["robust_vs_plain"] = (
            "holds if dropping a block costs the robust-trained UNet less quality, on average "
            "over its blocks, than the UNet fine-tuned as long without dropping", verdict, nums)
    if "evolution_vs_naive" in out:
        e, eq = q("evolved", ref)
        n, nq = q("evolved_cheapest", ref)
        naive = _read_json(root / "evolve_cheapest" / "evolve.json") or {}
        cost = (f" (naive: {naive['latency_ratio']:.1%} of the teacher's GFLOP)"
                if "latency_ratio" in naive else "")
        out["evolution_vs_naive"] = (
            f"holds if the evolved UNet at {ref} steps is clearly better than the one evolved "
            f"with the naive rule (remove the cheapest blocks), same training, {BOTH}",
            judged("better", e, n),
            f"evolved {eq}; naive {nq}{cost}")
    ctx["ablation_models"] = {k: v for k, v in merged.items() if k not in results}
    return out


MODEL_LABELS = {"teacher": "teacher (the world's SD-v1.5)",
                "evolved": "evolved UNet (robust training + evolution)",
                "student": "distilled evolved UNet, teacher's decoder",
                "final": "final: distilled evolved UNet + pruned decoder",
                "progressive": "ablation: progressive 4 -> 2 on the teacher's UNet",
                "vanilla": "ablation: direct student, vanilla loss only (p = 0)",
                "cfg_aware": "ablation: direct student, CFG-aware loss only (p = 1)",
                "gamma0": "ablation: direct student without the original loss (gamma = 0)",
                "guided": "ablation: guidance-conditioned evolved student (one call per step)",
                "final_random_decoder": "ablation: final model, decoder from a random init",
                "evolved_cheapest": "ablation: UNet evolved by the naive 'cheapest' rule"}


def _model_rows(results: Mapping) -> list[dict]:
    rows = []
    for name, res in results.items():
        for steps in sorted({s["steps"] for s in res["settings"]}, reverse=True):
            row, fd_row = best(results, name, steps), best(results, name, steps, FD)
            p = res["params"]
            rows.append({"model": name, "label": MODEL_LABELS.get(name, name),
                         "folder": res.get("folder"), "steps": steps,
                         "guidance": row["guidance"], "unet_calls": row["unet_calls"],
                         "params": sum(p.values()), "unet_params": p["unet"],
                         "decoder_params": p["vae_decoder"], "gflop_per_image": row["gflop"],
                         "latency_ms": (row["latency_s"] * 1e3 if "latency_s" in row
                                        else None),
                         "accuracy_all": row["metrics"][ALL],
                         "accuracy_mean": row["metrics"][MEAN],
                         "frechet_distance": row["metrics"][FD],
                         "best_frechet": {**fd_row["metrics"][FD],
                                          "guidance": fd_row["guidance"]}})
    return rows


def _read_json(path: epath.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _export_summary(export_dir: epath.Path) -> dict:
    out = {}
    torch_report = _read_json(export_dir / "torch" / "export_report.json")
    if torch_report:
        out["torch"] = {"folder": str(export_dir / "torch"),
                        "parity": {r["component"]: r["parity"]
                                   for r in torch_report["components"]},
                        "diffusers": torch_report.get("diffusers"),
                        "diffusers_misfits": torch_report.get("diffusers_misfits")}
    manifest = _read_json(export_dir / "coreml" / "snapjax_coreml_manifest.json")
    if manifest:
        schedule = manifest.get("schedule", {})
        out["coreml"] = {"folder": str(export_dir / "coreml"),
                         "steps": schedule.get("num_steps"),
                         "timesteps": schedule.get("timesteps"),
                         "guidance_scale": manifest.get("guidance_scale"),
                         "packages": sorted(manifest.get("models", {})),
                         "fp16_errors": {c.get("component"): c.get("fp16_err")
                                         for c in manifest.get("components", [])
                                         if isinstance(c, dict)}}
    return out


def build_report(workdir: epath.Path, records: Mapping, chain_config) -> dict:
    ev_doc = _read_json(workdir / "eval" / "eval.json")
    if ev_doc is None:
        raise FileNotFoundError(f"{workdir / 'eval' / 'eval.json'}: missing or unreadable; run "
                                "the eval stage (--stages eval,report)")
    results = ev_doc["models"]
    ctx = {"reference_steps": int(chain_config.eval.reference_steps),
           "few_steps": int(chain_config.distill_teacher_steps) // 4,
           "evolve": _read_json(workdir / "evolve" / "evolve.json"),
           "device": f"{ev_doc.get('backend')} {ev_doc.get('device')}"}
    decoder = (records.get("decoder") or {}).get("outputs") or {}
    ctx["decoder_psnr"] = decoder.get("eval/psnr")
    ctx["ablations"] = _ablation_verdicts(workdir, results, ctx)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "measured": {k: ev_doc.get(k) for k in ("date", "backend", "device", "jax", "flax",
                                                 "num_prompts", "seeds", "samples_per_setting",
                                                 "spacing")},
        "scaling": (f"the world's DDIM breaks between 8 and 2 steps, so the paper's 32 -> 16 -> 8 "
                    f"runs as {chain_config.distill_teacher_steps} -> "
                    f"{chain_config.distill_teacher_steps // 2} -> {ctx['few_steps']}: the "
                    f"world's {ctx['few_steps']}-step model stands for the paper's 8-step one"),
        "headroom": headroom(results, ctx["reference_steps"], ctx["few_steps"]),
        "claims": _claims(results, ctx),
        "models": _model_rows(results),
        "ablation_models": _model_rows(ctx.get("ablation_models", {})),
        "sweep": {name: res["settings"] for name, res in results.items()},
        "stages": {k: {"seconds": v.get("seconds"), "output": v.get("output")}
                   for k, v in records.items()},
        "export": _export_summary(workdir / "export"),
        "files": {k: f"eval/{v}" for k, v in ev_doc.get("files", {}).items()},
    }


def _fmt_iv(m: dict, digits: int) -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(m['value'])} [{f.format(m['low'])}, {f.format(m['high'])}]"


def render_markdown(report: dict) -> str:
    m = report["measured"]
    lines = ["# SnapFusion on the embedded world: the chain's report", "",
             f"Written {report['date']} by `snapjax world`. Every quality number: "
             f"{m['num_prompts']} held-out captions x {len(m['seeds'] or [])} noise seeds "
             f"(seeds {m['seeds']}; {m['samples_per_setting']} images per setting), the same "
             f"prompts and noise for every model, DDIM on the {m.get('spacing')} grid, read by "
             "the world's attribute reader; 95% intervals (accuracies: bootstrap over the "
             "images; Fréchet distance: t over seeds). Cost: GFLOP per image (text encoder, "
             f"every UNet call, one decode); latency per image at batch 1 on {m['backend']} "
             f"({m['device']}), jax {m['jax']}.", "", f"Scaling: {report['scaling']}.", ""]
    h = report["headroom"]
    meaning = {"yes": "Yes.", "no": "NO: the comparisons below mean little."}.get(
        h["verdict"], f"Partly, {h['verdict']}: only comparisons on that metric have room.")
    lines += ["## Headroom", "", f"**{meaning}** Rule: {h.get('rule', '')}."]
    if "reference" in h:
        lines += [f"Teacher at {h['reference_steps']} steps: {h['reference']}; at the "
                  f"students' {h['few_steps_count']}: {h['few_steps']}."]
    else:
        lines += [h.get("why", "")]
    lines += ["", "## The paper's claims", "", "| claim (paper) | world | verdict | rule |",
              "|---|---|---|---|"]
    for c in report["claims"]:
        lines.append(f"| {c['paper']} | {c['world']} | **{c['verdict']}** | {c['rule']} |")
    lines += ["", "## Models (each at its best-accuracy guidance of the sweep)", "",
              "| model | steps | guidance | UNet calls | params | UNet params | decoder params "
              "| GFLOP / image | latency / image | all attributes | mean accuracy | Fréchet | "
              "lowest Fréchet (guidance) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        lat = "—" if r["latency_ms"] is None else f"{r['latency_ms']:.1f} ms"
        lines.append(f"| {r['label']} | {r['steps']} | {r['guidance']:g} | {r['unet_calls']} | "
                     f"{r['params']:,} | {r['unet_params']:,} | {r['decoder_params']:,} | "
                     f"{r['gflop_per_image']:.4g} | {lat} | {_fmt_iv(r['accuracy_all'], 3)} | "
                     f"{_fmt_iv(r['accuracy_mean'], 3)} | {_fmt_iv(r['frechet_distance'], 1)} | "
                     f"{_fmt_iv(r['best_frechet'], 1)} ({r['best_frechet']['guidance']:g}) |")
    if report.get("ablation_models"):
        lines += ["", "## Ablation variants (each at its best guidance; no latency measured)",
                  "", "| model | steps | guidance | UNet calls | GFLOP / image | all attributes "
                  "| mean accuracy | Fréchet |", "|---|---|---|---|---|---|---|---|"]
        for r in report["ablation_models"]:
            lines.append(f"| {r['label']} | {r['steps']} | {r['guidance']:g} | "
                         f"{r['unet_calls']} | {r['gflop_per_image']:.4g} | "
                         f"{_fmt_iv(r['accuracy_all'], 3)} | {_fmt_iv(r['accuracy_mean'], 3)} | "
                         f"{_fmt_iv(r['frechet_distance'], 1)} |")
    lines += ["", "## The guidance sweep", "", "| model | steps | guidance | all attributes | "
              "Fréchet | per seed (all; Fréchet) |", "|---|---|---|---|---|---|"]
    for name, rows in report["sweep"].items():
        for s in rows:
            per = s["per_seed"]
            seeds = ", ".join(f"{a:.3f}" for a in per.get(ALL, []))
            fds = ", ".join(f"{v:.1f}" for v in per.get(FD, []))
            lines.append(f"| {name} | {s['steps']} | {s['guidance']:g} | "
                         f"{_fmt_iv(s['metrics'][ALL], 3)} | {_fmt_iv(s['metrics'][FD], 1)} | "
                         f"{seeds}; {fds} |")
    ex = report["export"]
    lines += ["", "## Export of the final model", ""]
    if "torch" in ex:
        t = ex["torch"]
        parity = ", ".join(f"{k} {v:.1e}" for k, v in t["parity"].items() if v is not None)
        misfits = "; ".join(t["diffusers_misfits"] or [])
        lines.append(f"- PyTorch mirrors in `{t['folder']}`: max abs difference to snapjax "
                     f"{parity}; diffusers folder: "
                     f"{'yes' if t['diffusers'] else 'no (' + misfits + ')'}.")
    if "coreml" in ex:
        c = ex["coreml"]
        lines.append(f"- Core ML packages {', '.join(c['packages'])} in `{c['folder']}`; the "
                     f"manifest samples {c['steps']} DDIM steps (timesteps {c['timesteps']}) at "
                     f"guidance {c['guidance_scale']}.")
    if not ex:
        lines.append("- not exported (the export stage did not run)")
    lines += ["", "## Stage times", "", "| stage | minutes | output |", "|---|---|---|"]
    total = 0.0
    for stage, r in report["stages"].items():
        sec = r.get("seconds")
        total += sec or 0.0
        lines.append(f"| {stage} | {'—' if sec is None else f'{sec / 60:.1f}'} | "
                     f"`{r.get('output') or ''}` |")
    lines.append(f"| total | {total / 60:.1f} | |")
    files = report["files"]
    if files:
        lines += ["", "## Figures", ""]
        if "curves" in files:
            lines += [f"Fréchet distance against all-attributes accuracy over the guidance "
                      f"sweep, one curve per model and step count: ![curves]({files['curves']})",
                      ""]
        for key, path in sorted(files.items()):
            if key.startswith("grid_"):
                lines.append(f"- {key[5:]} (one row per model, same prompts and noise): "
                             f"![{key}]({path})")
    return "\n".join(lines) + "\n"


def write_report(chain) -> dict[str, epath.Path]:
    """REPORT.md and report.json in ``chain.workdir``, local or ``gs://`` (written whole or not
    at all)."""
    from snapjax.eval.run import write_text
    from snapjax.train.world import read_records
    workdir = storage.path(chain.workdir)
    report = build_report(workdir, read_records(workdir), chain.config)
    paths = {"markdown": workdir / "REPORT.md", "json": workdir / "report.json"}
    for path, text in ((paths["json"], json.dumps(report, indent=1, default=str) + "\n"),
                       (paths["markdown"], render_markdown(report))):
        write_text(path, text)
    return paths


CLAIM_IDS: tuple[str, ...] = ("evolution_cost", "evolution_quality", "decoder_size",
                              "decoder_quality", "distill_beats_teacher", "headline_quality",
                              "headline_flops", "headline_latency",
                              *(claim_id for claim_id, _, _ in ABLATION_CLAIMS))
