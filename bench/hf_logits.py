"""Logits of a Hugging Face folder from transformers alone, in an interpreter where lwdsl cannot be
imported (the check that an exported folder needs nothing of lwdsl; the repository's paths and any
editable-install finder are dropped before anything is imported).

    python bench/hf_logits.py FOLDER IDS.npy REPO_ROOT      # writes IDS.npy.logits.npy ([n, vocab])
"""
import sys

sys.path = [p for p in sys.path if p and (not p.startswith(sys.argv[3]) or "site-packages" in p)]
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
for name in [m for m in sys.modules if m.startswith("__editable__")]:
    del sys.modules[name]
try:
    import lwdsl  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("lwdsl is importable: the check would not prove anything")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.from_numpy(np.load(sys.argv[2]))
with torch.inference_mode():
    np.save(sys.argv[2] + ".logits.npy", model(input_ids=ids).logits[0].float().numpy())
