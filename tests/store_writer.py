"""A feature store written directly from in-memory features (no Ray, no audio): for tests of the
stages that read the store. Rows have the store's schema (pipelines/store.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from asd.contracts import attribute_class, labelled_clip_name
from pipelines import store as S
from pipelines.stages.extract import write_shard


def clip_row(machine: str, section: str, split: str, domain: str, label: str, index: int, attribute: str,
             n_mels: int, n_frames: int, feature_version: str, content_hash: str) -> dict:
    """One clip's row of a shard, for a dev_data clip with the DCASE name these fields give."""
    path = f"dev_data/{machine}/{split}/" + labelled_clip_name(section, domain, split, label, index, attribute)
    return {"path": path, "dataset": "dev_data", "machine": machine, "section": section, "domain": domain,
            "split": split, "label": label, "index": index, "attribute": attribute,
            "attribute_class": attribute_class(machine, section, domain, attribute), "attributes_json": None,
            "content_hash": content_hash, "feature_version": feature_version, "n_mels": n_mels,
            "n_frames": n_frames, "source_sample_rate": 16000, "source_channels": 1, "resampled": False,
            "downmixed": False}


def write_store(store, feature_version: str, clips: list[tuple[dict, np.ndarray]]) -> None:
    """``clips``: (row from :func:`clip_row`, float32 features [n_mels, n_frames]); one shard per
    (machine, section, split), the manifest, and the store record."""
    vdir = S.version_dir(store, feature_version)
    groups: dict[tuple, list] = {}
    for row, feats in clips:
        groups.setdefault((row["machine"], row["section"], row["split"]), []).append((row, feats))
    manifest = []
    for (machine, section, split), members in groups.items():
        rel = f"{S.partition_dir('dev_data', machine, section, split)}/part-{split}.parquet"
        write_shard(vdir / rel, [r for r, _ in members], [np.asarray(f, np.float32).reshape(-1) for _, f in members],
                    "float32")
        manifest += [{"path": r["path"], "dataset": "dev_data", "machine": machine, "section": section,
                      "split": split, "domain": r["domain"], "label": r["label"], "content_hash": r["content_hash"],
                      "size": 0, "mtime_ns": 0, "n_frames": r["n_frames"], "shard": rel} for r, _ in members]
    S.write_manifest(vdir, pd.DataFrame(manifest))
    S.record_store(store, feature_version, {"dtype": "float32"})
