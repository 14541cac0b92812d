"""What identifies a profile: the model's weights, the options measured, the calibration text.

All three are computed without loading the model, so `find_profile` is cheap enough for every solve.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lwdsl.profile.options import Option
from lwdsl.profile.store import digest

# Bump with the estimator; part of the option hash. v3: perplexity_increase = expm1(kld); v5: joint
# calibration (upper quartile); v6: KL and NLL scales measured per option kind and depth third, prunes
# cross-fitted (`lwdsl.profile.calibrate`); v7: a format on column-pruned layers quantizes the kept columns;
# v8: the executor's minimum scale (an all-zero group of Qwen2.5's gave a zero fp16 scale and NaN deltas).
METHOD = "fisher-position-local/v8"
SAMPLES = 2  # labels drawn per position for the Fisher estimate


def model_hash(block, base_dir: Path) -> str | None:
    """Identity of the weights a model block names (file names, sizes, modification times);
    None for sources without weights (`arch:`, `config:`)."""
    if block.scheme in ("arch", "config"):
        return None
    from lwdsl.models.load import source_path

    path = source_path(block, Path(base_dir))
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    identity = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def option_hash(options: dict[str, list[Option]], samples: int = SAMPLES) -> str:
    payload = {name: [[f.model_dump(mode="json"), p.model_dump(mode="json")] for f, p in opts]
               for name, opts in sorted(options.items())}
    return digest(METHOD, str(samples), json.dumps(payload, sort_keys=True))


def plan_keys(plan_file, calibration_tokens: int | None = None):
    """`(model_hash, option_hash, text_hash)` for a plan, or None when there is nothing to profile."""
    plan, base_dir = plan_file.plan, Path(plan_file.base_dir)
    weights = model_hash(plan.model, base_dir)
    if weights is None:  # before the imports: verify.text loads torch, which a plan without weights never needs
        return None
    from lwdsl.inventory import load_inventory
    from lwdsl.profile.options import layer_options
    from lwdsl.verify.text import calibration_hash

    options = layer_options(plan, load_inventory(plan.model, base_dir))
    if not options:
        return None
    return weights, option_hash(options), calibration_hash(plan, base_dir, calibration_tokens)
