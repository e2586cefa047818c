import pytest

from qwenvl.data.dataset_use import DatasetUseError, format_dataset_use, parse_dataset_use, sample_count
from qwenvl.problems import Problem, did_you_mean


def test_dataset_use_roundtrip():
    entries = parse_dataset_use("a%5.437, b ,c%250")
    assert [(e.name, e.percent) for e in entries] == [("a", 5.437), ("b", 100.0), ("c", 250.0)]
    assert format_dataset_use(entries) == "a%5.437,b,c%250"


@pytest.mark.parametrize("bad", ["", "a,,b", "a%", "a%x", "a%-3", "a%0", "%50"])
def test_dataset_use_rejects(bad):
    with pytest.raises(DatasetUseError):
        parse_dataset_use(bad)


def test_sample_count_upsampling():
    assert sample_count(10, 250) == 25
    assert sample_count(1000, 5.437) == 54
    assert sample_count(7, 100) == 7


def test_problem_render_and_hint():
    p = Problem("error", "unknown key", file="d.json", line=3, column=5, key="sampleing_rate",
                hint=did_you_mean("sampleing_rate", ["sampling_rate", "length"]))
    assert p.render() == "d.json:3:5: error: [sampleing_rate] unknown key (hint: did you mean 'sampling_rate'?)"
