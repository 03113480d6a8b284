"""far/trainset.py: the instance/prior row streams in a fixed ratio, resuming, and rows at the wrong size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from far.errors import InvalidInputError
from far.trainset import RatioStream, RowPreparer
from tests.train_fixtures import composites


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainset")
    return {"mixed": composites(root, count=12, priors=4, resolution=64), "no_priors": composites(
        root, count=6, priors=0, resolution=64)}


def _take(stream: RatioStream, n: int, start: int = 0) -> list[dict]:
    rows = stream.rows(start)
    return [next(rows) for _ in range(n)]


def test_one_prior_row_per_instance_row_in_every_batch(data):
    rows = _take(RatioStream(data["mixed"], seed=3, prior_ratio=1.0), 40)
    kinds = [r["kind"] == "prior" for r in rows]
    assert all(kinds[i] + kinds[i + 1] == 1 for i in range(0, 40, 2))  # each batch of 2: one of each
    # each stream is a shuffled pass over its own rows: 12 instance rows seen once in the first 24 rows
    assert sorted(r["id"] for r in rows[:24] if r["kind"] != "prior") == [f"fusion-{i:04d}" for i in range(12)]
    assert {r["id"] for r in rows if r["kind"] == "prior"} == {f"prior-{i:04d}" for i in range(4)}


@pytest.mark.parametrize(("ratio", "batch", "priors_per_batch"), [(0.5, 3, 1), (3.0, 4, 3), (0.0, 2, 0)])
def test_the_ratio_holds_in_every_batch_and_over_the_run(data, ratio, batch, priors_per_batch):
    rows = _take(RatioStream(data["mixed"], seed=0, prior_ratio=ratio), 10 * batch)
    counts = [sum(r["kind"] == "prior" for r in rows[i : i + batch]) for i in range(0, len(rows), batch)]
    assert counts == [priors_per_batch] * 10


def test_resuming_at_any_position_continues_both_streams(data):
    stream = RatioStream(data["mixed"], seed=5, prior_ratio=0.5)
    whole = [r["id"] for r in _take(stream, 60)]
    for start in (1, 7, 13, 29):
        assert [r["id"] for r in _take(stream, 60 - start, start)] == whole[start:]


def test_a_prior_ratio_without_prior_rows_names_the_key(data):
    with pytest.raises(InvalidInputError, match=r"train.prior_ratio: 1.0 needs prior rows, but .* has none"):
        RatioStream(data["no_priors"], seed=0, prior_ratio=1.0)
    assert all(r["kind"] != "prior" for r in _take(RatioStream(data["no_priors"], 0, 0.0), 8))


def test_rows_at_another_size_are_refused_not_resized(data):
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[16, 32, 64, 64]))  # 8x; never encodes here
    preparer = RowPreparer(None, vae, [], resolution=128, factors=[2])
    row = _take(RatioStream(data["mixed"], seed=0, prior_ratio=0.0), 1)[0]
    with pytest.raises(InvalidInputError, match=rf"training row '{row['id']}': image or mask is 64x64 px, but "
                                                r"model.resolution is 128; re-run the fuse stage"):
        preparer.prepare([row])
