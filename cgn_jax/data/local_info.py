"""`DatasetInfo` for datasets that are only ever built from local files.

For a dataset not yet on disk, TFDS looks for its precomputed metadata in the public GCS
bucket, and creates a temporary download directory before it checks. Ours are never in
that bucket, so each builder construction left an empty `/tmp/tmp*tfds` behind.
"""

from __future__ import annotations

import tensorflow_datasets as tfds


class LocalDatasetInfo(tfds.core.DatasetInfo):
    def initialize_from_bucket(self) -> None:
        """Nothing to fetch: the metadata comes from the builder's code until it is built."""
