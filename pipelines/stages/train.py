"""``asd train``: train the configured detector's stages (``method:``), or one of them, on Ray Train.

The same training ``asd run`` does, without extraction or scoring: each stage writes its model to
``<run_dir>/models/<stage>`` and starts from the model of the stage the detector names (the
prototype method's fine-tuning from pre-training, unless ``finetune.from_scratch``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import detectors
from pipelines.config import add_config_arguments, load_config
from pipelines.errors import UserError, require_feature_store
from pipelines.locks import run_dir_lock


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the configured detector (Ray Train)",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--stage", help="train only this stage (prototype: pretrain or finetune; default: "
                                   "every stage the config enables, in order)")
    p.add_argument("--store", help="feature store (default: from the config)")
    p.add_argument("--out", help="where to write the trained model (with --stage; default: "
                                 "<run_dir>/models/<stage>)")
    p.add_argument("--init", help="model directory to start from (default: the model of the stage it follows)")
    p.add_argument("--address", help="Ray cluster address (default: local Ray, or $RAY_ADDRESS)")
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg.ray.address = args.address
    detector = detectors.get(cfg.method)
    if args.stage is not None and args.stage not in detector.stage_names:
        raise UserError(f"--stage {args.stage}: method={cfg.method} has the stages {', '.join(detector.stage_names)}")
    if (args.out or args.init) and args.stage is None:
        raise UserError("--out and --init need --stage: each stage has its own model and starting point")
    with run_dir_lock(cfg.run_dir):  # `asd run` or `asd score` of the same run directory would race
        store = args.store or cfg.path(cfg.extract.store)
        require_feature_store(store, cfg.features.version)
        follows = {s.name: s.init for s in detector.stages(cfg)}
        for stage in [args.stage] if args.stage else list(follows):
            init = args.init
            if init is None and follows.get(stage):
                init = detector.model_dir(cfg, follows[stage])
                if not (init / detector.weights_file).is_file():
                    raise UserError(f"{stage} starts from {init}, which holds no model: run "
                                    f"`asd train --stage {follows[stage]}` first (or change the config)")
            out = Path(args.out) if args.out else detector.model_dir(cfg, stage)
            model_dir = detector.fit(cfg, stage, store=store, out_dir=out, init_model=init)
            print(f"{stage}: model written to {model_dir}")
            print(json.dumps(detector.load(model_dir)[1].get("epochs")))
    return 0
