"""On the embedded SmolLM2-135M: SpenseGPT at rho = 0.25 keeps more quality than SparseGPT 2:4.

Reduced calibration (16 x 512 tokens) and evaluation (4 x 1024 tokens of the tragedies) keep it to a few
minutes on two CPU cores; docs/QUALITY.md has the full-size numbers.
"""

from __future__ import annotations

from vllm_spense.offline.pruner import PruneRecipe
from vllm_spense.offline.quality import run_table


def test_spensegpt_beats_sparsegpt_2_4_on_held_out_text():
    rows = {"dense": None,
            "SparseGPT 2:4": PruneRecipe(method="sparsegpt", dense_fraction=0.0),
            "SpenseGPT rho=0.25": PruneRecipe(dense_fraction=0.25)}
    ppl = {r["row"]: r["perplexity"] for r in run_table(rows, nsamples=16, seqlen=512, eval_windows=4, device="cpu")}
    assert 15 < ppl["dense"] < 40, ppl  # the model loaded and reads English
    assert ppl["dense"] < ppl["SpenseGPT rho=0.25"] < ppl["SparseGPT 2:4"], ppl
    removed = (ppl["SparseGPT 2:4"] - ppl["SpenseGPT rho=0.25"]) / (ppl["SparseGPT 2:4"] - ppl["dense"])
    assert removed > 0.3, ppl
