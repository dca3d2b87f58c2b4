"""The chain report's rules on hand-made results: best guidance, matches, clearly better, the
headroom check and the claims' verdicts follow the numbers."""

from __future__ import annotations

import pytest

from snapjax.eval import report


def _row(steps, guidance, acc, acc_half, fd, fd_half, gflop=1.0, latency=0.1, calls=2):
    return {"steps": steps, "guidance": guidance, "unet_calls": calls, "gflop": gflop,
            "latency_s": latency,
            "metrics": {report.ALL: {"value": acc, "low": acc - acc_half, "high": acc + acc_half,
                                     "n": 768},
                        report.MEAN: {"value": 0.99, "low": 0.98, "high": 1.0, "n": 768},
                        report.FD: {"value": fd, "low": fd - fd_half, "high": fd + fd_half,
                                    "n": 256, "seeds": 3, "sd": fd_half / 2}},
            "per_seed": {}}


def _model(*rows, decoder_params=400_000, decoder_gflop=0.1):
    return {"params": {"unet": 1_000_000, "vae_decoder": decoder_params, "text_encoder": 100},
            "gflop_per_call": {"unet": 0.06, "vae_decoder": decoder_gflop, "text_encoder": 0.01},
            "settings": list(rows)}


def test_best_takes_each_metric_at_its_own_best_guidance():
    results = {"m": _model(_row(2, 1, 0.80, 0.02, 50, 2), _row(2, 2, 0.90, 0.02, 40, 2),
                           _row(2, 4, 0.90, 0.02, 30, 2), _row(2, 7, 0.85, 0.02, 25, 2),
                           _row(50, 2, 0.99, 0.01, 10, 1))}
    assert report.best(results, "m", 2)["guidance"] == 4           # tie on accuracy: lower FD
    assert report.best(results, "m", 2, report.FD)["guidance"] == 7
    assert report.best(results, "m", 50)["guidance"] == 2
    assert report.best(results, "m", 8) is None and report.side(results, "x", 2) is None


def _side(acc, acc_half, fd, fd_half):
    row = _row(2, 2, acc, acc_half, fd, fd_half)
    return {report.ALL: row, report.FD: row}


@pytest.mark.parametrize("acc, fd, verdict_matches, verdict_better", [
    (0.93, 20.0, report.HOLDS, report.FAILS),           # inside both intervals
    (0.98, 15.0, report.HOLDS, report.HOLDS),           # both intervals apart, in its favour
    (0.88, 20.0, "holds on Fréchet only", report.FAILS),
    (0.93, 30.0, "holds on accuracy only", report.FAILS),
    (0.93, 12.0, report.HOLDS, "holds on Fréchet only"),
])
def test_matches_and_better_per_metric(acc, fd, verdict_matches, verdict_better):
    other = _side(0.93, 0.02, 20.0, 3.0)
    mine = _side(acc, 0.01, fd, 1.0)
    assert report.judge("matches", mine, other) == verdict_matches
    assert report.judge("better", mine, other) == verdict_better


def test_headroom_needs_an_imperfect_reference_and_a_worse_few_step_teacher():
    def teacher(ref_acc, few_acc, few_fd=80):
        return {"teacher": _model(_row(50, 2, ref_acc, 0.015, 20, 1),
                                  _row(2, 2, few_acc, 0.02, few_fd, 5))}
    assert report.headroom(teacher(0.93, 0.65), 50, 2)["verdict"] == "yes"
    saturated = report.headroom(teacher(0.99, 0.65), 50, 2)          # ends above 0.98
    assert saturated["verdict"] == "no" and not saturated["short_of_perfect"]
    # the world's case: few steps as accurate, but a far worse Fréchet distance
    flat = report.headroom(teacher(0.93, 0.92), 50, 2)
    assert flat["verdict"] == "only on the Fréchet distance" and not flat["holds"]
    assert report.headroom(teacher(0.93, 0.92, few_fd=21), 50, 2)["verdict"] == "no"
    missing = report.headroom({"teacher": _model(_row(50, 2, 0.9, 0.01, 20, 1))}, 50, 2)
    assert missing["verdict"] == report.NOT_MEASURED


def test_claim_verdicts_follow_the_numbers():
    results = {
        "teacher": _model(_row(50, 2, 0.94, 0.015, 20, 1, gflop=6.2, latency=0.08, calls=100),
                          _row(2, 2, 0.65, 0.03, 75, 8, gflop=0.37, latency=0.01, calls=4)),
        "evolved": _model(_row(50, 2, 0.93, 0.015, 21, 1, gflop=3.8, calls=100),
                          _row(2, 2, 0.70, 0.03, 60, 8, gflop=0.28, calls=4)),
        "student": _model(_row(2, 2, 0.92, 0.02, 21, 1, gflop=0.28, calls=4)),
        "final": _model(_row(2, 2, 0.91, 0.02, 20.5, 1, gflop=0.19, latency=0.004, calls=4),
                        decoder_params=100_000, decoder_gflop=0.025)}
    ctx = {"reference_steps": 50, "few_steps": 2, "decoder_psnr": 30.0,
           "evolve": {"start_blocks": 15, "blocks": 8, "start_latency": 0.06,
                      "final_latency": 0.036, "target_latency": 0.036, "unit": "GFLOP",
                      "latency_ratio": 0.6}}
    verdicts = {c["id"]: c["verdict"] for c in report._claims(results, ctx)}
    assert list(verdicts) == list(report.CLAIM_IDS)
    assert verdicts["evolution_cost"] == report.HOLDS
    assert verdicts["evolution_quality"] == report.HOLDS          # 0.93 >= 0.925, 21 <= 21
    assert verdicts["decoder_size"] == report.HOLDS               # 4x fewer params
    assert verdicts["decoder_quality"] == report.HOLDS
    assert verdicts["distill_beats_teacher"] == report.HOLDS      # 0.90 > 0.68; 22 < 67
    assert verdicts["headline_quality"] == "holds on Fréchet only"  # 0.91 < 0.925; 20.5 <= 21
    assert verdicts["headline_flops"] == report.HOLDS             # 0.19 / 6.2 = 0.03
    assert verdicts["headline_latency"] == report.HOLDS           # 20x
    assert all(verdicts[c] == report.NOT_MEASURED for c, _, _ in report.ABLATION_CLAIMS)

    ctx["evolve"]["final_latency"] = 0.040                         # missed its target
    results["final"]["settings"][0]["latency_s"] = 0.02            # only 4x faster
    verdicts = {c["id"]: c["verdict"] for c in report._claims(results, ctx)}
    assert verdicts["evolution_cost"] == verdicts["headline_latency"] == report.FAILS
