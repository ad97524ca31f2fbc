"""The data layout: which split row each batch position reads, and which rows a host loads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.data import shuffle
from cgn_jax.data.sharding import DataShards, ShardingError, resolve


def _epoch_rows(layout: DataShards, key, epoch: int) -> np.ndarray:
    """(steps_per_epoch, G) rows read in one epoch."""
    positions = jnp.arange(layout.global_batch)
    steps = range(epoch * layout.steps_per_epoch, (epoch + 1) * layout.steps_per_epoch)
    return np.stack([np.asarray(layout.example_index(key, jnp.int32(s), positions)) for s in steps])


def test_one_shard_is_the_permutation_of_the_whole_split():
    layout, key = DataShards(100, 1, 8), jax.random.PRNGKey(3)
    rows = _epoch_rows(layout, key, epoch=1)
    # the key stream of runs made before sharding existed: epoch key, position within the epoch
    expected = shuffle.index_shuffle(jax.random.fold_in(key, 1), jnp.arange(12 * 8), 100)
    np.testing.assert_array_equal(rows.ravel(), np.asarray(expected))
    assert len(set(rows.ravel().tolist())) == 96  # no row twice in an epoch


def test_each_shard_feeds_its_block_of_every_batch_without_repeats():
    layout, key = DataShards(103, 4, 8), jax.random.PRNGKey(0)  # shards of 25; the last 3 rows are left out
    assert (layout.shard_size, layout.per_shard_batch, layout.steps_per_epoch) == (25, 2, 12)
    e0, e1 = _epoch_rows(layout, key, 0), _epoch_rows(layout, key, 1)
    for s in range(4):
        block = e0[:, 2 * s:2 * s + 2].ravel()
        assert block.min() >= 25 * s and block.max() < 25 * (s + 1), s
        assert len(set(block.tolist())) == block.size  # a permutation within the shard
    assert e0.max() < 100
    assert not np.array_equal(e0, e1)  # a fresh order every epoch


@pytest.mark.parametrize("shards,processes", [(1, 2), (2, 2), (4, 2), (2, 4), (3, 3), (8, 4)])
def test_a_host_loads_every_row_its_devices_read(shards, processes):
    g = 24
    layout, key = DataShards(240, shards, g), jax.random.PRNGKey(1)
    rows = _epoch_rows(layout, key, 0)
    per_host = g // processes
    loaded = 0
    for p in range(processes):
        start, stop = layout.host_rows(p, processes)
        read = rows[:, p * per_host:(p + 1) * per_host]
        assert read.min() >= start and read.max() < stop, (p, start, stop)
        loaded += stop - start
    if shards % processes == 0:  # whole shards per host: the hosts split the data, nothing twice
        assert loaded == layout.shard_size * shards
    if shards == 1:
        assert layout.host_rows(1, processes) == (0, 240)


def test_bad_layouts_say_what_to_change():
    with pytest.raises(ShardingError, match="does not split over dataset.shards=3"):
        DataShards(100, 3, 16)
    with pytest.raises(ShardingError, match="cannot feed"):
        DataShards(20, 4, 32)
    with pytest.raises(ShardingError, match=">= 1"):
        resolve(100, 16, -1, process_count=1)
    with pytest.raises(ShardingError, match="does not split over 3 processes"):
        resolve(100, 16, 1, process_count=3)
    assert resolve(100, 16, 0, process_count=2).num_shards == 2
    assert resolve(100, 16, 0, process_count=1) == DataShards(100, 1, 16)


def test_reading_rows_of_a_split_reads_exactly_those(tmp_path):
    from conftest import SHARED

    from cgn_jax.data import load_variant, open_split, variant_size

    args = dict(mnist_dir=SHARED / "data" / "mnist", data_dir=tmp_path, limit=64)
    full = load_variant("colored", "train", **args)
    assert variant_size("colored", "train", **args) == 64 == full["label"].shape[0]
    part = load_variant("colored", "train", rows=(16, 40), **args)
    for k, v in full.items():
        np.testing.assert_array_equal(part[k], v[16:40], err_msg=k)
    with pytest.raises(ValueError, match="rows"):
        load_variant("colored", "train", rows=(40, 80), **args)
    split = open_split("colored", "train", **args)  # what training uses: one builder for size and rows
    assert split.size == 64
    np.testing.assert_array_equal(split.read(rows=(3, 9))["digit"], full["digit"][3:9])

