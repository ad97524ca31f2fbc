"""Which training example each position of each global batch reads, and which rows a host loads.

The split is cut into `S` equal contiguous shards (the last `n mod S` examples are left
out). Every epoch each shard is read in its own random order, and every global batch
takes `G / S` consecutive positions of each shard's order: positions
`[s * G/S, (s+1) * G/S)` of the global batch come from shard `s`. With `S = 1` this is
one random permutation of the whole split per epoch, as the official loader.

Nothing here depends on how many devices or processes run the step, so a run is the
same run on 1 device, 8 devices or 2 hosts. What the layout buys is locality: devices
are ordered by process, so the devices of one host read a contiguous run of shards, and
that host loads only those rows from disk (`host_rows`). With `S` equal to the process
count `P` each host loads `1/P` of the split; with `S = 1` every host loads all of it.
`S = 0` in a config means "one shard per process".
"""

from __future__ import annotations

import dataclasses

import jax

from cgn_jax.data import shuffle


class ShardingError(ValueError):
    """A shard count that cannot work with this dataset, batch or process count."""


@dataclasses.dataclass(frozen=True)
class DataShards:
    num_examples: int  # size of the split (after dataset.limit)
    num_shards: int    # S
    global_batch: int  # G

    def __post_init__(self):
        n, s, g = self.num_examples, self.num_shards, self.global_batch
        if s < 1:
            raise ShardingError(f"dataset.shards must be >= 1 (or 0 for one per process), got {s}")
        if g % s:
            raise ShardingError(f"train.batch_size={g} does not split over dataset.shards={s}: each global batch "
                                f"takes the same number of examples from every shard; use a batch size that is a "
                                f"multiple of {s}, or fewer shards")
        if n // s < g // s:
            raise ShardingError(f"the training set has {n} examples: {s} shard(s) of {n // s} cannot feed "
                                f"{g // s} examples each per step (global batch {g}); lower train.batch_size "
                                f"or dataset.shards, or raise dataset.limit")

    @property
    def shard_size(self) -> int:
        return self.num_examples // self.num_shards

    @property
    def per_shard_batch(self) -> int:
        return self.global_batch // self.num_shards

    @property
    def steps_per_epoch(self) -> int:
        return self.shard_size // self.per_shard_batch

    def host_rows(self, process_index: int, process_count: int) -> tuple[int, int]:
        """Rows [start, stop) of the split that the devices of process `process_index` read.

        Devices are ordered by process, so host p computes global-batch positions
        [p * G/P, (p+1) * G/P), which fall in a contiguous run of shards.
        """
        if self.global_batch % process_count:
            raise ShardingError(f"train.batch_size={self.global_batch} does not split over {process_count} processes")
        if not 0 <= process_index < process_count:
            raise ShardingError(f"process index {process_index} is not in [0, {process_count})")
        per_host = self.global_batch // process_count
        first = process_index * per_host // self.per_shard_batch
        last = ((process_index + 1) * per_host - 1) // self.per_shard_batch
        return first * self.shard_size, (last + 1) * self.shard_size

    def example_index(self, key: jax.Array, step, positions: jax.Array) -> jax.Array:
        """Split row read at global-batch `positions` of `step` (jittable; `key` is the run's shuffle key)."""
        epoch, pos = step // self.steps_per_epoch, step % self.steps_per_epoch
        epoch_key = jax.random.fold_in(key, epoch)
        if self.num_shards == 1:  # one permutation of the split (the key stream of runs before sharding)
            return shuffle.index_shuffle(epoch_key, pos * self.global_batch + positions, self.num_examples)
        shard, j = positions // self.per_shard_batch, positions % self.per_shard_batch
        within = jax.vmap(lambda s, i: shuffle.index_shuffle(jax.random.fold_in(epoch_key, s), i, self.shard_size))(
            shard, pos * self.per_shard_batch + j)
        return shard * self.shard_size + within


def resolve(num_examples: int, global_batch: int, shards: int, process_count: int | None = None) -> DataShards:
    """The layout for a config's `dataset.shards` (0 = one shard per process), checked for this job."""
    count = jax.process_count() if process_count is None else process_count
    layout = DataShards(int(num_examples), int(shards) or count, int(global_batch))
    layout.host_rows(0, count)  # raises if the global batch does not split over the processes
    return layout
