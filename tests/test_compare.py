"""`cltune compare`: interval math against hand-computed values, and the command end to end on the
tiny model (naive and replay × 2 seeds), its figures recomputed by hand from the runs' own files."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cltune.evaluation.stats import (
    hierarchical_draws,
    log_ppl,
    mean_interval,
    percentile_interval,
    pooled_paired_differences,
    resamples,
    t975,
)

from helpers import QUIET_EVAL, deterministic, phase1_relative, tiny_run_config


def test_t_intervals_match_hand_computation():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(22) == 2.086 and t975(1000) == 1.96
    mean, low, high = mean_interval([1.0, 2.0, 3.0])  # sd 1, half-width 4.303/√3
    assert (mean, low, high) == pytest.approx((2.0, 2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert mean_interval([5.0]) == (5.0, None, None)


def test_paired_differences_resample_both_runs_alike():
    a = ([2.0, 4.0, 6.0], [1, 2, 3])  # ln PPL = 12 / 6 = 2
    b = ([1.0, 4.0, 3.0], [1, 2, 3])  # ln PPL = 8 / 6
    point, draws = pooled_paired_differences([(a, b)], [[(0, [0, 0, 0])], [(0, [1, 2, 2])]])  # one seed
    assert point == pytest.approx(2 - 8 / 6)
    assert draws == pytest.approx([2 / 1 - 1 / 1, (4 + 12) / 8 - (4 + 6) / 8])
    assert log_ppl(*a, [2, 2]) == pytest.approx(2.0)
    assert percentile_interval(list(range(1, 101))) == (3, 98)  # nearest rank: 2.5% → 3rd, 97.5% → 98th
    assert resamples(4, 3, seed=1) == resamples(4, 3, seed=1) and all(len(r) == 4 for r in resamples(4, 3, seed=1))
    assert percentile_interval([float(i) for i in range(1000)]) == (24.0, 974.0)  # ranks 25 and 975, not 26


def test_the_two_level_bootstrap_pools_seeds_and_utterances():
    seed0 = (([2.0, 4.0], [1, 2]), ([1.0, 4.0], [1, 2]))  # ln PPL 2 vs 5/3
    seed1 = (([3.0, 3.0], [1, 1]), ([1.0, 1.0], [1, 1]))  # ln PPL 3 vs 1
    point, values = pooled_paired_differences([seed0, seed1], [[(1, [0, 1]), (1, [1, 1])], [(0, [0, 0]), (1, [0, 0])]])
    assert point == pytest.approx(((2 - 5 / 3) + (3 - 1)) / 2)
    assert values == pytest.approx([2.0, ((2 - 1) + 2.0) / 2])  # seed 1 twice; then seed 0's first utterance twice
    draws = hierarchical_draws([2, 5], 50, seed=3)
    assert draws == hierarchical_draws([2, 5], 50, seed=3) and {len(d) for d in draws} == {2}
    assert all(len(picks) == (2, 5)[i] for d in draws for i, picks in d)
    assert {i for d in draws for i, _ in d} == {0, 1}


def _cltune(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cltune", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_compare_end_to_end_with_figures_recomputed_by_hand(tiny_model_dir, two_tasks, tmp_path):
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "naive",
                                                     eval=QUIET_EVAL)))
    out = tmp_path / "cmp"
    proc = _cltune("compare", config, "--strategies", "replay", "--seeds", "2", "--bootstrap", "200", "--out", out,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[4/4] replay, seed 1: running" in proc.stdout and f"compare: {out / 'compare.md'}" in proc.stdout
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["strategies"]) == ["naive", "replay"] and summary["seeds"] == [0, 1]

    runs = {(s, seed): out / "runs" / f"{s}-seed{seed}" for s in ("naive", "replay") for seed in (0, 1)}
    metrics = {k: json.loads((d / "metrics.json").read_text()) for k, d in runs.items()}
    # replay takes naive's phase 1 (same seed, same phase-1 settings) instead of training it again
    assert metrics[("replay", 0)]["ppl"][1] == metrics[("naive", 0)]["ppl"][1]
    assert metrics[("replay", 1)]["phases"][0]["strategy"]["phase1_from"] == str(runs[("naive", 1)] / "phase1")
    # intervals over the 2 seeds: mean ± 12.706 · sd / √2
    final = [metrics[("replay", seed)]["ppl"][-1][0] for seed in (0, 1)]
    mean, sd = sum(final) / 2, abs(final[0] - final[1]) / math.sqrt(2)
    entry = summary["strategies"]["replay"]["final_ppl"][0]
    assert (entry["mean"], entry["low"], entry["high"]) == pytest.approx(
        (mean, mean - 12.706 * sd / math.sqrt(2), mean + 12.706 * sd / math.sqrt(2)))
    ratios = [metrics[("replay", s)]["ppl"][-1][-1] / metrics[("naive", s)]["ppl"][-1][-1] for s in (0, 1)]
    assert summary["strategies"]["replay"]["new_task_ratio"]["mean"] == pytest.approx(sum(ratios) / 2)
    # the paired difference on guest_a: the mean over seeds of ln PPL(replay) − ln PPL(naive) on the same utterances
    nll = {k: json.loads((d / "test_nll.json").read_text())["single"]["guest_a"] for k, d in runs.items()}
    points = [log_ppl(nll[("replay", s)]["nll"], nll[("replay", s)]["targets"])
              - log_ppl(nll[("naive", s)]["nll"], nll[("naive", s)]["targets"]) for s in (0, 1)]
    change = summary["strategies"]["replay"]["vs_naive"]["guest_a"]
    assert change["change_pct"] == pytest.approx(100 * (math.exp(sum(points) / 2) - 1))
    pairs = [((nll[("replay", s)]["nll"], nll[("replay", s)]["targets"]),
              (nll[("naive", s)]["nll"], nll[("naive", s)]["targets"]))
             for s in (0, 1)]
    _, values = pooled_paired_differences(pairs, hierarchical_draws([len(a[0]) for a, _ in pairs], 200))
    boot_low, boot_high = percentile_interval(values)
    # the wider of the bootstrap and the t-interval over the two seeds' paired differences (12.706: t, 1 df)
    half = 12.706 * abs(points[0] - points[1]) / math.sqrt(2) / math.sqrt(2)
    low, high = min(boot_low, sum(points) / 2 - half), max(boot_high, sum(points) / 2 + half)
    assert (change["low_pct"], change["high_pct"]) == pytest.approx((100 * (math.exp(low) - 1),
                                                                     100 * (math.exp(high) - 1)))
    assert change["resolved"] == (low > 0 or high < 0) and change["seeds"] == 2
    # the pass ledger: replay's reused phase 1 counts naive's work; its phase 2 trains on more utterances
    passes = {k: [p["strategy"]["forward_tokens"] for p in m["phases"]] for k, m in metrics.items()}
    assert passes[("replay", 0)][0] == passes[("naive", 0)][0] > 0
    assert passes[("replay", 0)][1] > passes[("naive", 0)][1] > 0
    assert all(p["strategy"]["backward_tokens"] == p["strategy"]["forward_tokens"] for m in metrics.values()
               for p in m["phases"])  # no teacher, no reference pass: every forward trains
    forward = [sum(passes[("replay", s)]) / sum(passes[("naive", s)]) for s in (0, 1)]
    assert summary["strategies"]["replay"]["forward_vs_naive"]["mean"] == pytest.approx(sum(forward) / 2)
    assert summary["strategies"]["naive"]["forward_vs_naive"]["mean"] == 1.0
    assert [summary["strategies"][s]["guard_backoffs"] for s in ("naive", "replay")] == [[], []]
    text = (out / "compare.md").read_text()
    assert "## Against naive, paired on the same test utterances" in text and f"{change['change_pct']:+.1f}%" in text
    assert (out / "compare.png").exists() and "data:image/png;base64" in (out / "compare.html").read_text()
    assert "replay,single,final_ppl,guest_a," in (out / "compare.csv").read_text()

    again = _cltune("compare", config, "--strategies", "replay", "--seeds", "2", "--bootstrap", "200", "--out", out,
                    cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("reused (finished earlier)") == 4, again.stdout + again.stderr
    assert json.loads((out / "compare.json").read_text()) == summary

    # The same compare as Ray tasks of one CPU each on a local Ray (`--ray`): every metric of every run identical
    # (one torch thread on both sides), replay's task waiting for naive's phase 1, a line per finished run.
    parallel = _cltune("compare", config, "--strategies", "replay", "--seeds", "2", "--bootstrap", "200", "--out",
                       tmp_path / "ray", "--ray", "--run-cpus", "1", cwd=tmp_path)
    assert parallel.returncode == 0, parallel.stderr
    assert "ray: 4 runs, 1 CPUs each, on 1 node(s)" in parallel.stdout
    lines = [line for line in parallel.stdout.splitlines() if line.startswith("[") and " done on " in line]
    assert len(lines) == 4 and all("final mean PPL" in line for line in lines), parallel.stdout
    for (strategy, seed), folder in runs.items():
        one = phase1_relative(metrics[(strategy, seed)], out)
        two = phase1_relative(json.loads((tmp_path / "ray" / "runs" / folder.name / "metrics.json").read_text()),
                              tmp_path / "ray")
        assert deterministic(one) == deterministic(two), folder.name
    figures = json.loads((tmp_path / "ray" / "compare.json").read_text())["strategies"]["replay"]["final_ppl"]
    assert figures == summary["strategies"]["replay"]["final_ppl"]
    reused = _cltune("compare", config, "--strategies", "replay", "--seeds", "2", "--bootstrap", "200", "--out",
                     tmp_path / "ray", "--ray", "--run-cpus", "1", cwd=tmp_path)
    assert reused.returncode == 0 and reused.stdout.count("reused (finished earlier)") == 4, reused.stdout
    assert "ray:" not in reused.stdout  # nothing to run: no Ray started


def test_a_paired_change_holds_the_runs_training_noise_through_the_seeds_spread(tmp_path):
    """Three seeds whose paired differences all lean one way but spread widely (runs of one config part so): a
    bootstrap over three seeds calls the change resolved, the t-interval over the seeds does not — the interval is
    the wider of the two. With one seed only the bootstrap is left."""
    from cltune.studies.compare import paired_change

    rng = random.Random(0)
    shifts = [0.02, 0.30, 0.05]  # nats per target token, one seed each
    dirs = {}
    for seed, shift in enumerate(shifts):
        nll = [rng.uniform(30, 60) for _ in range(40)]
        targets = [rng.randrange(8, 16) for _ in range(40)]
        for side, extra in (("strategy", shift), ("naive", 0.0)):
            folder = tmp_path / f"{side}-seed{seed}"
            folder.mkdir()
            rows = {"lines": list(range(2, 42)), "nll": [v + extra * t for v, t in zip(nll, targets)],
                    "targets": targets}
            (folder / "test_nll.json").write_text(json.dumps({"single": {"guest_a": rows}}))
            dirs.setdefault(side, []).append(folder)
    change = paired_change(dirs["strategy"], dirs["naive"], "guest_a", "single", 500)
    mean = sum(shifts) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in shifts) / 2)
    assert change["change_pct"] == pytest.approx(100 * (math.exp(mean) - 1))
    assert change["low_pct"] == pytest.approx(100 * (math.exp(mean - 4.303 * sd / math.sqrt(3)) - 1))
    assert change["low_pct"] < 0 < change["high_pct"] and not change["resolved"] and change["seeds"] == 3
    rows = [[json.loads((d / "test_nll.json").read_text())["single"]["guest_a"] for d in pair]
            for pair in zip(dirs["strategy"], dirs["naive"])]
    pairs = [((a["nll"], a["targets"]), (b["nll"], b["targets"])) for a, b in rows]
    _, values = pooled_paired_differences(pairs, hierarchical_draws([40] * 3, 500))
    assert percentile_interval(values)[0] > 0  # the bootstrap alone: "resolved"
    one = paired_change(dirs["strategy"][1:2], dirs["naive"][1:2], "guest_a", "single", 500)
    assert one["resolved"] and one["low_pct"] > 20 and one["seeds"] == 1  # 0.30 nats a token, 40 utterances


def test_the_reading_names_the_phases_where_the_loss_guard_backed_off():
    from cltune.studies.compare_report import reading

    summary = {"seeds": [0, 1, 2], "strategies": {
        "naive": {"guard_backoffs": [[0, 1, 1]]},
        "replay": {"vs_naive": {"guest_a": {"resolved": False}}, "guard_backoffs": [[2, 2, 2]]}}}
    lines = reading(summary)
    guarded = [line for line in lines if "loss guard" in line]
    assert guarded == ["- The loss guard backed off (a rising training loss: the weights taken back, the learning "
                       "rates halved) in naive seed 0 phase 1 (1×), replay seed 2 phase 2 (2×): those phases "
                       "trained less than the others."]
    summary["strategies"]["naive"]["guard_backoffs"] = summary["strategies"]["replay"]["guard_backoffs"] = []
    assert not any("loss guard" in line for line in reading(summary))


def test_compare_replaces_a_run_of_another_config_and_resumes_its_own(tiny_model_dir, two_tasks, tmp_path):
    """Its run folders are compare's own: another config's run is rerun (--overwrite), this config's
    unfinished run continued (--resume) — never a dead end telling the user to pass a flag compare lacks."""
    from cltune.api import make_config
    from cltune.config import dump_config
    from cltune.studies.compare import run_state

    config = make_config(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "naive"))
    assert run_state(config) == ("other", None)  # nothing there: a fresh run
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "config.resolved.yaml").write_text("name: another config\n")
    assert run_state(config) == ("other", None)  # another config's run: replaced
    (config.run_dir / "config.resolved.yaml").write_text(dump_config(config))
    assert run_state(config) == ("interrupted", None)  # this config, no metrics yet: resumed
    # A section naive does not read (another strategy's, or one cltune added since) leaves the run its own;
    # a setting it does read makes it another config's.
    saved = yaml.safe_load(dump_config(config))
    saved["lwf"]["temperature"] = 9.0
    saved.pop("gem")
    saved["eval"].pop("precision")  # a setting added later, at its default
    (config.run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(saved))
    assert run_state(config) == ("interrupted", None)
    saved["train"]["lr"] = 0.5
    (config.run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(saved))
    assert run_state(config) == ("other", None)


def test_compare_names_an_unknown_strategy(tmp_path):
    config = tmp_path / "stream.yaml"
    config.write_text("tasks: [{path: a.csv}]\n")
    proc = _cltune("compare", config, "--strategies", "replay,magic", "--out", tmp_path / "cmp", cwd=tmp_path)
    assert proc.returncode == 2 and "--strategies: unknown magic" in proc.stderr and "Traceback" not in proc.stderr
