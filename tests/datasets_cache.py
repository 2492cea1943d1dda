"""A Hugging Face datasets cache built offline, laid out as `load_dataset("org/name")` leaves it.

With HF_HUB_OFFLINE=1, `load_dataset("org/name")` cannot reach the hub and falls back to the
cache: `<HF_DATASETS_CACHE>/org___name/<config>/<version>/<hash>/` holding `dataset_info.json` and
`name-<split>.arrow` (datasets' CachedDatasetModuleFactory and its `cache` builder).  We write that
directory with datasets' own Parquet builder (the builder a hub repo of Parquet files gets), under
the name and config the hub path uses; only the `org___` prefix, which the builder adds when it
knows the repo id (and then insists on hf:// data files), is set by moving the directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def cache_hub_dataset(
    cache: Path,
    repo_id: str,
    splits: dict,
    config: str = "default",
    commit: str = "0123456789abcdef0123456789abcdef01234567",
) -> Path:
    """Write `splits` ({split: [row dicts]}) as hub dataset `repo_id` into the cache `cache`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo_id.split("/")
    work = Path(cache).parent / f".build-{org}--{name}-{config}"
    (work / "data").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(work / "data" / f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), files[split])
    builder = Parquet(
        cache_dir=str(work / "build"),
        dataset_name=name,
        config_name=config,
        hash=commit,
        data_files=files,
    )
    builder.download_and_prepare()
    target = Path(cache) / f"{org}___{name}" / config / "0.0.0" / commit
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(work)
    return target
