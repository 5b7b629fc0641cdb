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
