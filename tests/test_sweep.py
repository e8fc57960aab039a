import pytest

from polymorph.sweep import SweepSyntaxError, expand_ranges


def test_inclusive_range_becomes_a_comma_list():
    assert expand_ranges(["seed=0..2", "stage=sae"]) == ["seed=0,1,2", "stage=sae"]
    assert expand_ranges(["sae.expansion=8..8"]) == ["sae.expansion=8"]


def test_other_sweep_syntax_passes_through():
    args = ["seed=range(0,9)", "seed=0,1,2", "paths.root=../x", "name=a.b", "-m"]
    assert expand_ranges(args) == args


@pytest.mark.parametrize("arg, fragment", [("seed=5..2", "reversed"), ("seed=a..b", "two integers")])
def test_bad_ranges_fail_clearly(arg, fragment):
    with pytest.raises(SweepSyntaxError, match=fragment):
        expand_ranges([arg])


@pytest.mark.parametrize("overrides, values", [
    (["seed=0,1,2", "experiment=smoke"], ["0", "1", "2"]),
    (["seed=range(0,3)"], ["0", "1", "2"]),
    (["seed=4", "io=independent,shared"], None),  # one seed: not a seed sweep
    (["experiment=smoke"], None),
    (["seed=interval(0,1)"], None), (["seed=glob(*)"], None),  # no list of seeds to check
])
def test_the_preflight_reads_the_swept_seeds(overrides, values):
    from polymorph.preflight import swept_values

    assert swept_values(overrides, "seed") == values
