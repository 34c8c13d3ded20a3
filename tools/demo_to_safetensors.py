#!/usr/bin/env python
"""Re-save the shipped demo models (``python/idemrt/demo_models``) as safetensors, tensor for tensor.

Reads each model file named in ``demo_models/config.json`` (a safetensors or a weights-only PyTorch
file), writes the same tensors (same names, dtypes and values: fp16 parameters, exact CDF tables) to
``<stem>.safetensors``, checks the new file holds exactly the same tensors, points config.json at it
and deletes the old file. Files that already are ``.safetensors`` are left alone, so the script can
be run again. ``tools/train_demo.py`` writes safetensors itself; this converted the pickles it
wrote before.

    python tools/demo_to_safetensors.py [--dir python/idemrt/demo_models] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import idemrt  # noqa: F401
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(ROOT / "python"))

from idemrt.models.checkpoint_io import load_state_dict, save_state_dict  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(ROOT / "python" / "idemrt" / "demo_models"))
    p.add_argument("--keep", action="store_true", help="keep the old files")
    args = p.parse_args(argv)
    folder = Path(args.dir)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("codec", "unet"):
        old = folder / config[key]["file"]
        if old.suffix == ".safetensors":
            print(f"{key}: {old.name} is safetensors already")
            continue
        new = old.with_suffix(".safetensors")
        state = load_state_dict(old, name_pin=False)
        save_state_dict(state, new, fmt="safetensors", force=True, metadata={"model": key})
        again = load_state_dict(new)
        assert again.keys() == state.keys()
        assert all(again[k].dtype == v.dtype and torch.equal(again[k], v) for k, v in state.items())
        config[key]["file"] = new.name
        tmp = config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, config_path)
        if not args.keep:
            old.unlink()
        print(f"{key}: {old.name} -> {new.name} ({len(state)} tensors, {new.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
