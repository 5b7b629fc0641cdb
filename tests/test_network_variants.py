"""benchmarks/network_variants.py: the coarser class sets are read from the clips' attribute strings,
whatever their keys, and keep machine, section and domain apart."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import network_variants  # noqa: E402  (benchmarks/ is not a package)
from pipelines.store import ClipTable  # noqa: E402

CLASSES = ["ToyCar/00/source/car_A1_spd_28V_mic_1", "ToyCar/00/source/car_A1_spd_31V_mic_1",
           "ToyCar/00/target/car_B2_spd_28V_mic_2", "pump/01/source/noAttributes", "valve/00/source/"]


def test_first_attribute_classes_keep_the_first_key_value_pair_per_machine_section_and_domain():
    table = ClipTable(meta=pd.DataFrame({"attribute_class": CLASSES + [None]}), features=[])
    got = network_variants.with_classes(table, "first").meta["attribute_class"].tolist()
    # independent reference: the first two "_"-separated tokens of the attribute string
    want = [re.sub(r"^([^/]*/[^/]*/[^/]*/)([^_]*(?:_[^_]*)?).*$", r"\1\2", c) for c in CLASSES]
    assert got[:-1] == want and pd.isna(got[-1])  # an unlabelled clip stays unlabelled
    assert len(set(got[:3])) == 2  # both 28 V and 31 V clips of car A1 fall in one class


def test_domain_classes_drop_the_attributes_and_the_default_keeps_them():
    got = [network_variants.coarse_class(c, "domain") for c in CLASSES]
    assert got == ["ToyCar/00/source/", "ToyCar/00/source/", "ToyCar/00/target/", "pump/01/source/", "valve/00/source/"]
    assert [network_variants.coarse_class(c, "attributes") for c in CLASSES] == CLASSES


def test_one_network_per_machine_type_trains_on_each_types_clips_and_scores_all_sections_together(monkeypatch):
    """Each machine type's run sees only that type's clips (features aligned with their rows), and
    the combined score is the official score over every section of every run (scipy's hmean)."""
    import numpy as np
    import torch
    from scipy.stats import hmean

    machines = ["fan", "valve", "fan", "ToyCar", "valve"]
    table = ClipTable(meta=pd.DataFrame({"machine": machines, "path": [f"c{i}" for i in range(5)]}),
                      features=[torch.full((2, 3), float(i)) for i in range(5)])
    rng = np.random.default_rng(0)
    seen, values = {}, []

    def fake_run(cfg, train, test, class_set, stats, every):
        (machine,) = set(train.meta["machine"])
        seen[machine] = (train.meta["path"].tolist(), [int(f[0, 0]) for f in train.features])
        points = []
        for epoch in (0, 2):
            sections = [{"machine": machine, "section": s, "auc_source": a, "auc_target": b, "pauc": c}
                        for s, (a, b, c) in zip(("00", "01"), rng.uniform(0.3, 0.9, (2, 3)))]
            if epoch == 2:
                values.extend(v for s in sections for v in (s["auc_source"], s["auc_target"], s["pauc"]))
            points.append({"epoch": epoch, "loss": 1.0, "sections": sections})
        return {"classes": 2, "curve": points, "final": points[-1], "seconds": 1.0}

    monkeypatch.setattr(network_variants, "run_variant", fake_run)
    out = network_variants.per_machine_type(None, table, table, "attributes", "all", 2)
    assert seen == {"fan": (["c0", "c2"], [0, 2]), "valve": (["c1", "c4"], [1, 4]), "ToyCar": (["c3"], [3])}
    assert out["classes"] == 6 and [p["epoch"] for p in out["curve"]] == [0, 2]
    assert abs(out["final"]["Overall"] - hmean(values)) < 1e-12
    assert set(out["final"]["per machine type"]) == {"fan", "valve", "ToyCar"}
