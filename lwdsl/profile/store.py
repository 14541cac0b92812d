"""Where quality profiles live: `$LWDSL_CACHE/profiles` (default `~/.cache/lwdsl/profiles`).

A profile is keyed by what it was measured from: the model's weights (`model_hash`), the options
profiled (`option_hash`) and the calibration text (`text_hash`). The same plan, or any plan with the
same model, options and calibration text, finds it again, so re-solving is instant. Files are
written atomically (temporary file, then rename).

    >>> find_profile(plan_file)          # doctest: +SKIP
    QualityProfile(model_hash='...', ...)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from lwdsl.solution import QualityProfile

PROFILE_FORMAT = 3  # bump when the measurement method changes what a profile means (2: calibration mixes
# the plan's text with the other kind's corpus, `lwdsl.verify.text.calibration_mix`; 3: and keeps each
# text's own figures, `ProfileEntry.by_text`)


def profiles_root() -> Path:
    base = os.environ.get("LWDSL_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "lwdsl") / "profiles"


def digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def profile_key(model_hash: str, option_hash: str, text_hash: str) -> str:
    return digest(str(PROFILE_FORMAT), model_hash, option_hash, text_hash)


def profile_path(model_hash: str, option_hash: str, text_hash: str) -> Path:
    return profiles_root() / f"{profile_key(model_hash, option_hash, text_hash)}.json"


def save_profile(profile: QualityProfile, option_hash: str) -> Path:
    """Store `profile` under its key, atomically; returns the file written."""
    path = profile_path(profile.model_hash, option_hash, profile.text_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"option_hash": option_hash, "profile": profile.model_dump(mode="json")}
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path


def load_profile(model_hash: str, option_hash: str, text_hash: str) -> QualityProfile | None:
    path = profile_path(model_hash, option_hash, text_hash)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return QualityProfile.model_validate(payload["profile"])
    except (OSError, ValueError, KeyError):
        return None


def find_profile(plan_file) -> QualityProfile | None:
    """The stored profile for this plan's model, allowed options and calibration text, if any, with
    the figures of the plan's `eval` text when calibration read that text too (`for_text`).

    Cheap: hashes the model file's identity and the plan's options, and reads the calibration text
    (the tokenizer is not loaded; the text hash is computed from the text and the window plan)."""
    from lwdsl.profile.keys import plan_keys

    keys = plan_keys(plan_file)
    if keys is None:
        return None
    profile = load_profile(*keys)
    if profile is None:
        return None
    evaluation = plan_file.plan.model.eval
    return for_text(profile, evaluation.source if evaluation else "text:python-docs")


def for_text(profile: QualityProfile, source: str) -> QualityProfile:
    """The profile as a plan checked on `source` should read it: each entry's figures on that text
    when calibration measured it (`ProfileEntry.by_text`), else the mix of the calibration texts.

        >>> for_text(profile, "text:alice").entries[0].perplexity_increase    # doctest: +SKIP
    """
    if not profile.entries or not all(source in entry.by_text for entry in profile.entries):
        return profile
    entries = [entry.model_copy(update={"kld": entry.by_text[source][0],
                                        "perplexity_increase": entry.by_text[source][1]})
               for entry in profile.entries]
    return profile.model_copy(update={"entries": entries})
