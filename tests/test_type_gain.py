"""benchmarks/type_gain.py: a dataset cut to some machine types at their own gain holds the same clips
as the full dataset, another gain changes only the anomalous clips, and rows of another generator
version are left out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import realism  # noqa: E402  (benchmarks/ is not a package)
import type_gain  # noqa: E402
from pipelines.synth.generate import PRESETS, generate  # noqa: E402

TINY = PRESETS["tiny"]  # fan and valve


def test_cut_dataset_matches_the_full_one_and_a_gain_moves_only_anomalies(tmp_path, capsys):
    own = dict(TINY.difficulty.machine_anomaly_gain).get("fan", 1.0)  # the fan's gain in the default
    other = own / 2
    out = tmp_path / "out"
    args = ["--dataset", "tiny", "--machines", "fan", "--ae-epochs", "0", "--data-seeds", "0", "--out", str(out)]
    assert type_gain.main([*args, "--gains", str(own), str(other)]) == 0
    rows = json.loads((out / "type_gain.json").read_text())["rows"]
    at_own = next(r for r in rows.values() if r["gain"] == own)
    # independent of the cut: the whole tiny dataset generated as the pipeline would, measured per type
    generate(TINY, tmp_path / "full", seed=0)
    full = realism.measure(tmp_path / "full", 0, 0, untrained=False)
    for d in ("kNN floor", "spectral kNN", "spectral kNN, standardised"):
        assert at_own[d] == {"fan": full[f"{d} per machine type"]["fan"]}
    trees = {r["gain"]: next(p for p in (out / "work").iterdir() if f"gain-{r['gain']:g}_" in p.name)
             for r in rows.values()}
    normal = changed = 0
    for wav in sorted((trees[other] / "dev_data").rglob("*.wav")):
        same = wav.read_bytes() == (trees[own] / wav.relative_to(trees[other])).read_bytes()
        if "_normal_" in wav.name:
            assert same, wav.name
            normal += 1
        else:
            changed += not same
    assert normal and changed == sum(1 for w in (trees[other] / "dev_data").rglob("*_anomaly_*.wav"))
    line = next(x for x in (out / "type_gain.md").read_text().splitlines() if x.startswith(f"| tiny | fan | {other:g} |"))
    assert line.endswith(f"| {type_gain.PAPER_AE['fan']:.1f} |")
    # a row of another generator version: reported, left out, measured again
    saved = json.loads((out / "type_gain.json").read_text())
    key = next(k for k, r in saved["rows"].items() if r["gain"] == other)
    saved["rows"][key]["data"]["seconds"] = 99.0
    (out / "type_gain.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert type_gain.main([*args, "--gains", str(other)]) == 0
    printed = capsys.readouterr().out
    assert f"{key} was measured on another version of the generator; left out" in printed
    assert f"type_gain: {key}: " in printed
