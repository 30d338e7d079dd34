"""The claims sweep's statistics (benchmarks/claims/stats.py), its prompt splits and its checkable signals."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.claims.stats import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    Interval,
    decide,
    length_adjustment,
    paired_bootstrap,
    pearson,
)


# ----------------------------------------------------------------------------- bootstrap
def test_constant_differences_give_a_zero_width_interval_at_that_value():
    a = np.full((3, 20), 0.7)
    b = np.full((3, 20), 0.45)
    interval = paired_bootstrap(a, b, replicates=500)
    assert interval.estimate == pytest.approx(0.25)
    assert interval.low == pytest.approx(0.25) and interval.high == pytest.approx(0.25)
    assert (interval.seeds, interval.prompts) == (3, 20)


def test_pairing_cancels_prompt_difficulty():
    # Prompts differ wildly in difficulty, but A is exactly 0.1 above B on every prompt and seed.
    difficulty = np.linspace(0.0, 0.9, 30)
    b = np.tile(difficulty, (3, 1))
    interval = paired_bootstrap(b + 0.1, b, replicates=500)
    assert interval.low == pytest.approx(0.1) and interval.high == pytest.approx(0.1)


def test_bootstrap_matches_a_direct_numpy_resampling_loop():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.5, 0.2, size=(3, 12)), rng.normal(0.45, 0.2, size=(3, 12))
    replicates = 300
    interval = paired_bootstrap(a, b, replicates=replicates, seed=11)
    # The same draws, in the same order, resampled cell by cell.
    ref_rng = np.random.default_rng(11)
    seed_draws = ref_rng.integers(0, 3, size=(replicates, 3))
    prompt_draws = ref_rng.integers(0, 12, size=(replicates, 12))
    diff = a - b
    stats = [diff[np.ix_(seed_draws[r], prompt_draws[r])].mean() for r in range(replicates)]
    low, high = np.quantile(stats, [0.025, 0.975])
    assert interval.estimate == pytest.approx(diff.mean())
    assert interval.low == pytest.approx(low, abs=1e-12)
    assert interval.high == pytest.approx(high, abs=1e-12)


def test_bootstrap_is_deterministic_and_refuses_bad_tables():
    a = np.arange(12.0).reshape(3, 4)
    assert paired_bootstrap(a, seed=3) == paired_bootstrap(a, seed=3)
    with pytest.raises(ValueError, match="different shapes"):
        paired_bootstrap(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap(np.zeros((0, 4)))


def test_one_cell_per_seed_resamples_seeds_only():
    # Run-level numbers (time, memory): a 1-D array is one value per seed.
    interval = paired_bootstrap(np.array([100.0, 110.0, 120.0]), np.array([50.0, 50.0, 50.0]), replicates=2000)
    assert interval.prompts == 1 and interval.seeds == 3
    assert interval.estimate == pytest.approx(60.0)
    assert 50.0 <= interval.low < 60.0 < interval.high <= 70.0


# ----------------------------------------------------------------------------- verdict rules
def _rows(mean_a: float, mean_b: float, noise: float, seed: int = 0, shape=(3, 40)):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, size=shape[1])  # per-prompt difficulty, shared by both arms
    a = base + mean_a + rng.normal(0, noise, size=shape)
    b = base + mean_b + rng.normal(0, noise, size=shape)
    return a, b


def test_a_clear_win_is_reproduced():
    a, b = _rows(0.15, 0.0, 0.05)
    interval = paired_bootstrap(a, b)
    assert interval.low > 0
    assert decide("beats", interval) == REPRODUCED
    assert decide("beats", paired_bootstrap(b, a)) == NOT_REPRODUCED  # the other way round is contradicted


def test_a_clear_tie_within_the_margin_is_equal_and_not_worse():
    a, b = _rows(0.0, 0.0, 0.02, seed=1)
    interval = paired_bootstrap(a, b)
    assert -0.03 < interval.low and interval.high < 0.03
    assert decide("equal", interval, margin=0.03) == REPRODUCED
    assert decide("not_worse", interval, margin=0.03) == REPRODUCED
    assert decide("beats", interval) == INCONCLUSIVE


def test_noisy_small_samples_must_come_out_inconclusive():
    # Two seeds, eight prompts, noise far above the 0.02 gap: neither a win nor a tie can be shown.
    a, b = _rows(0.02, 0.0, 0.3, seed=2, shape=(2, 8))
    interval = paired_bootstrap(a, b)
    assert interval.low < 0 < interval.high and interval.high - interval.low > 0.06
    assert decide("beats", interval) == INCONCLUSIVE
    assert decide("equal", interval, margin=0.03) == INCONCLUSIVE
    assert decide("not_worse", interval, margin=0.03) == INCONCLUSIVE


def test_verdict_boundaries_on_hand_made_intervals():
    def iv(low, high):
        return Interval((low + high) / 2, low, high, 3, 10)

    assert decide("beats", iv(0.001, 0.2)) == REPRODUCED
    assert decide("beats", iv(0.0, 0.2)) == INCONCLUSIVE  # touching 0 is not excluding it
    assert decide("beats", iv(-0.2, -0.01)) == NOT_REPRODUCED
    assert decide("equal", iv(-0.02, 0.02), margin=0.03) == REPRODUCED
    assert decide("equal", iv(0.01, 0.05), margin=0.03) == INCONCLUSIVE  # straddles the margin
    assert decide("equal", iv(0.04, 0.08), margin=0.03) == NOT_REPRODUCED  # wholly outside it
    assert decide("not_worse", iv(-0.02, 0.5), margin=0.03) == REPRODUCED
    assert decide("not_worse", iv(-0.05, 0.01), margin=0.03) == INCONCLUSIVE
    assert decide("not_worse", iv(-0.09, -0.04), margin=0.03) == NOT_REPRODUCED
    assert decide("above", iv(-0.01, 0.2), margin=0.05) == REPRODUCED
    assert decide("below", iv(-0.3, -0.1)) == REPRODUCED
    assert decide("below", iv(-0.3, 0.1)) == INCONCLUSIVE
    with pytest.raises(ValueError, match="needs a positive margin"):
        decide("equal", iv(-0.01, 0.01))
    with pytest.raises(ValueError, match="unknown check kind"):
        decide("better", iv(0.1, 0.2))


# ----------------------------------------------------------------------------- length control
def test_length_adjustment_recovers_the_length_effect_and_removes_it():
    rng = np.random.default_rng(0)
    runs, prompts, lengths, ended, values = [], [], [], [], []
    effect = {"short": 0.6, "long": 0.6}  # the same quality; "long" is only longer
    prompt_bias = rng.uniform(-0.1, 0.1, size=10)
    for run, extra in (("short", 0), ("long", 40)):
        for p in range(10):
            for _seed in range(3):
                length = 20 + extra + rng.integers(0, 20)
                stop = float(rng.random() < 0.7)
                runs.append(run)
                prompts.append(p)
                lengths.append(length)
                ended.append(stop)
                values.append(effect[run] + prompt_bias[p] + 0.004 * length + 0.05 * stop)
    adjusted, coef = length_adjustment(np.array(values), np.array(lengths), np.array(ended), np.array(runs),
                                       np.array(prompts))
    assert coef["length"] == pytest.approx(0.004, abs=1e-9)
    assert coef["ended"] == pytest.approx(0.05, abs=1e-9)
    runs = np.array(runs)
    raw_gap = np.mean(np.array(values)[runs == "long"]) - np.mean(np.array(values)[runs == "short"])
    lc_gap = adjusted[runs == "long"].mean() - adjusted[runs == "short"].mean()
    assert raw_gap > 0.1  # length alone makes "long" look better...
    assert lc_gap == pytest.approx(0.0, abs=1e-9)  # ...and the adjustment removes exactly that


def test_length_adjustment_with_no_eos_spread_leaves_the_eos_term_out():
    # run a is worth 0.0, run b 0.2, and every token adds 0.01; all completions ended
    values = np.array([0.1, 0.3, 0.5, 0.3])
    adjusted, coef = length_adjustment(values, np.array([10, 30, 30, 10]), np.ones(4), np.array(["a", "a", "b", "b"]),
                                       np.array([0, 1, 0, 1]))
    assert coef["ended"] == 0.0
    assert coef["length"] == pytest.approx(0.01)
    assert np.allclose(adjusted, [0.2, 0.2, 0.4, 0.4])  # at the mean length, 20


def test_pearson_on_hand_values():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert np.isnan(pearson([1, 2], [1, 2]))  # too few points
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))  # no spread


# ----------------------------------------------------------------------------- prompt splits
def test_validation_eval_and_training_prompts_are_disjoint():
    from unialign.data.bundled import load_bundled
    from unialign.evaluate import load_prompts

    def keys(rows):
        return {str(r["prompt"]) for r in rows}

    train, test = keys(load_bundled("prompts", "train")), keys(load_bundled("prompts", "test"))
    val, final = keys(load_bundled("prompts", "val")), keys(load_bundled("prompts", "eval"))
    assert (len(val), len(final), len(test)) == (27, 58, 85)
    assert val.isdisjoint(final) and val | final == test
    assert val.isdisjoint(train) and final.isdisjoint(train)
    # the pairwise rows the sweep scores implicit rewards on follow the same split
    assert keys(load_bundled("pairwise", "val")) <= val and keys(load_bundled("pairwise", "eval")) <= final
    # and what the sweep's evaluation reads by name is that split
    assert {str(p) for p in load_prompts("bundled:prompts:eval")} == final


def test_the_sweep_training_prompts_are_one_set_for_every_format():
    from benchmarks.claims.runner import prompt_key, training_prompts
    from unialign.data.bundled import load_bundled

    chosen = training_prompts(40)
    assert len(chosen) == 40 and training_prompts(40) == chosen
    assert training_prompts(20) <= chosen  # smaller sets are nested
    heldout = {prompt_key(r["prompt"]) for r in load_bundled("prompts", "test")}
    assert chosen.isdisjoint(heldout)
    for fmt in ("pairwise", "triple", "listwise", "prompts"):
        rows = [r for r in load_bundled(fmt, "train") if prompt_key(r["prompt"]) in chosen]
        assert 38 <= len(rows) <= 40  # a format may drop a prompt whose completions all tie


# ----------------------------------------------------------------------------- checkable signals
def test_checkable_scores_on_hand_written_answers():
    from unialign.evaluate import checkable_scores

    prompts = ["Yuki has 29 apples and gets 14 more. How many apples does Yuki have now?",
               "What is the capital of France?",
               "Describe the sun in one sentence.",
               "Write a short poem about the sea."]
    right = ["Yuki has 29 + 14 = 43 apples.", "The capital of France is Paris.", "The sun is a hot star.",
             "Waves."]
    wrong = ["Yuki has 42 apples.", "It is Lyon.", "The sun is hot. It is a star.", "Waves."]
    correct, formatted = checkable_scores(prompts, right)
    assert correct == [1.0, 1.0, None, None]
    assert formatted == [None, None, 1.0, None]
    correct, formatted = checkable_scores(prompts, wrong)
    assert correct == [0.0, 0.0, None, None]
    assert formatted == [None, None, 0.0, None]
